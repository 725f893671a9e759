"""Compression trade-off of a translation model: size, latency, throughput and BLEU per variant.

Variants: fp32, bf16 weights, int8 dynamic, int8 weight-only, structured pruning at
each --prune level (default 25, 30 and 50%; also fine-tuned with --finetune-steps),
and each pruned model + int8 dynamic. Each is written once under --work (reused by later runs) and loaded
through `load_model_dir`, as the inference verbs load it.

Measured on the CPU at each --threads count, variants interleaved (the order
rotates every repeat, so drifting machine load hits all alike), after a warm-up,
as medians: batch-1 greedy and beam-4 latency per sentence, batched greedy
throughput; then BLEU / chrF on the test sentences (beam = the model's eval.beam).
Test data: --data TSV (header src<TAB>tgt), or by default the model's own held-out
test split rebuilt from its config (leak-free by construction).

    python benchmarks/compression/bench_compression.py MODEL_DIR [--data TEST.tsv] [--finetune-steps N] [--distill ALPHA]
        [--calibrate N] [--threads 1,2] [--repeats 3] [--latency-sentences 12] [--batch-sentences 64]
        [--bleu-sentences 400] [--work DIR] [--out DIR]

Writes OUT/bench_compression.json and OUT/bench_compression.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from trainformer.bench.testset import spread_by_length, translation_test_set
from trainformer.compression.pipeline import prune_model_dir, quantize_model_dir
from trainformer.errors import run_script
from trainformer.inference.loading import load_translator
from trainformer.inference.translator import Translator
from trainformer.modeldir import resolve_model_dir
from trainformer.paths import REPO_ROOT
from trainformer.rundir import hardware, package_versions
from trainformer.tasks.translation import score_translations
from trainformer.training.task import spread_indices

# ----------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------


def _once(out: Path, make) -> Path:
    """Build a variant dir unless a complete one is already there."""
    if not (out / "compression.json").is_file():
        make(out)
    return out


def make_variants(model_dir: Path, work: Path, finetune_steps: int, overrides: list[str],
                  levels: tuple[int, ...] = (25, 30, 50), finetune_levels: tuple[int, ...] | None = None,
                  calibrate: int = 0, distill: float = 0.0) -> dict[str, Path]:
    """name -> model dir of every variant (created under `work` when missing).

    ``calibrate`` > 0: pruning scores units by their activations on that many training
    batches (``trainformer prune --calibrate``); those variants are named ``struct-N-cal``.
    ``distill`` > 0: fine-tuning learns from the unpruned model too (``trainformer prune
    --distill``); those variants end in ``-kdALPHA``.
    """
    work.mkdir(parents=True, exist_ok=True)
    v: dict[str, Path] = {"fp32": model_dir}
    for method, name in (("bf16", "bf16"), ("dynamic", "int8-dynamic"), ("weight_only", "int8-weight-only")):
        v[name] = _once(work / name, lambda o, m=method: quantize_model_dir(model_dir, o, m))
    for pct in levels:
        name = f"struct-{pct}" + ("-cal" if calibrate else "")
        v[name] = _once(work / name, lambda o, p=pct: prune_model_dir(model_dir, o, "structured", p / 100,
                                                                      calibrate=calibrate))
        base = v[name]
        if finetune_steps and (finetune_levels is None or pct in finetune_levels):
            ft = f"{name}-ft{finetune_steps}" + (f"-kd{distill:g}" if distill else "")
            v[ft] = _once(work / ft, lambda o, p=pct: prune_model_dir(
                model_dir, o, "structured", p / 100, finetune_steps=finetune_steps, overrides=overrides,
                calibrate=calibrate, distill=distill))
            base = v[ft]
        q = f"{base.name}+int8"
        v[q] = _once(work / q, lambda o, b=base: quantize_model_dir(b, o, "dynamic"))
    return v


def stored_weights(path: Path) -> int:
    """Numbers stored in model.safetensors, less quantization scales and zero points."""
    total = 0
    with safe_open(str(resolve_model_dir(path) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if not key.endswith(("weight_scale", "weight_zero_point")):
                total += math.prod(f.get_slice(key).get_shape())
    return total


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------


def per_sentence_ms(tr: Translator, sentences: list[str], beam: int) -> list[float]:
    out = []
    for s in sentences:
        start = time.perf_counter()
        tr.translate([s], beam=beam)
        out.append(1000 * (time.perf_counter() - start))
    return out


def batch_throughput(tr: Translator, sentences: list[str]) -> float:
    start = time.perf_counter()
    tr.translate(sentences, beam=1)
    return len(sentences) / (time.perf_counter() - start)


def measure_speed(translators: dict[str, Translator], threads: list[int], repeats: int,
                  latency: list[str], batch: list[str]) -> dict[str, dict[str, Any]]:
    """Interleaved timing of every variant; medians per variant and thread count."""
    raw: dict[tuple[str, int], dict[str, list[float]]] = {
        (v, t): {"greedy": [], "beam4": [], "batch": []} for v in translators for t in threads}
    names = list(translators)
    for t in threads:  # warm-up: first calls allocate and pick kernels
        torch.set_num_threads(t)
        for v in names:
            translators[v].translate(latency[:2], beam=4)
            translators[v].translate(batch[:8], beam=1)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for t in threads:
            torch.set_num_threads(t)
            for v in order:
                cell = raw[(v, t)]
                cell["greedy"] += per_sentence_ms(translators[v], latency, 1)
                cell["beam4"] += per_sentence_ms(translators[v], latency, 4)
                cell["batch"].append(batch_throughput(translators[v], batch))
        print(f"  repeat {r + 1}/{repeats} done", flush=True)
    out: dict[str, dict[str, Any]] = {v: {} for v in names}
    for (v, t), cell in raw.items():
        out[v][f"threads_{t}"] = {
            "greedy_ms": round(statistics.median(cell["greedy"]), 2),
            "beam4_ms": round(statistics.median(cell["beam4"]), 2),
            "batch_sent_per_s": round(statistics.median(cell["batch"]), 2),
        }
    return out


def measure_quality(tr: Translator, sources: list[str], refs: list[list[str]]) -> dict[str, Any]:
    hyps = [h[0] for h in tr.translate(sources, beam=tr.cfg.eval.beam)]
    scores = score_translations(hyps, refs)
    out_tokens = sum(len(tr.tokenizer.encode(h)) for h in hyps) / max(1, len(hyps))
    return {"bleu": scores["bleu"], "chrf": scores["chrf"], "mean_output_tokens": round(out_tokens, 2)}


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    threads = results["settings"]["threads"]
    head = ["variant", "MB", "weights (M)", "BLEU", "chrF"]
    for t in threads:
        head += [f"greedy ms ({t}t)", f"beam4 ms ({t}t)", f"batch sent/s ({t}t)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results["variants"]["fp32"]
    for name, r in results["variants"].items():
        row = [name, f"{r['bytes'] / 1e6:.1f}", f"{r['weights'] / 1e6:.2f}", f"{r['bleu']:.2f}", f"{r['chrf']:.1f}"]
        for t in threads:
            s, b = r[f"threads_{t}"], base[f"threads_{t}"]
            row += [f"{s['greedy_ms']:.1f} ({b['greedy_ms'] / s['greedy_ms']:.2f}x)",
                    f"{s['beam4_ms']:.1f} ({b['beam4_ms'] / s['beam4_ms']:.2f}x)",
                    f"{s['batch_sent_per_s']:.1f} ({s['batch_sent_per_s'] / b['batch_sent_per_s']:.2f}x)"]
        lines.append("| " + " | ".join(row) + " |")
    note = ("Latency: median ms per sentence, batch 1; (Nx) = speed-up over fp32. "
            "Batched: greedy sentences/s. BLEU/chrF: sacreBLEU, beam = eval.beam.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--data", type=Path, default=None, help="test TSV (default: the model's test split)")
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="fine-tuning overrides")
    ap.add_argument("--prune", default="25,30,50", help="structured pruning levels, percent")
    ap.add_argument("--finetune-levels", default=None, help="the levels to fine-tune (default: all)")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="prune by activations on N training batches (trainformer prune --calibrate N)")
    ap.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                    help="fine-tune with the unpruned model as teacher (trainformer prune --distill ALPHA)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-sentences", type=int, default=12)
    ap.add_argument("--batch-sentences", type=int, default=64)
    ap.add_argument("--bleu-sentences", type=int, default=400)
    ap.add_argument("--work", type=Path, default=None, help="variant dirs (default: OUT/variants)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "compression")
    args = ap.parse_args()

    model_dir = resolve_model_dir(args.model_dir)
    threads = [int(t) for t in args.threads.split(",")]
    print("building variants ...", flush=True)
    try:
        levels = tuple(int(x) for x in args.prune.split(",") if x.strip())
        ft_levels = None if args.finetune_levels is None else tuple(int(x) for x in args.finetune_levels.split(","))
    except ValueError:
        ap.error("--prune / --finetune-levels: expected comma-separated whole percentages, e.g. 25,30,50")
    variants = make_variants(model_dir, args.work or args.out / "variants", args.finetune_steps, args.overrides,
                             levels, ft_levels, args.calibrate, args.distill)
    sources, refs = translation_test_set(model_dir, args.data)
    latency = spread_by_length(sources, args.latency_sentences)
    batch = [sources[i] for i in spread_indices(len(sources), args.batch_sentences)]
    translators = {name: load_translator(path, "cpu", "fp32") for name, path in variants.items()}
    print(f"timing {len(translators)} variants at threads {threads} ...", flush=True)
    speed = measure_speed(translators, threads, args.repeats, latency, batch)
    torch.set_num_threads(max(threads))
    results: dict[str, Any] = {
        "model_dir": str(model_dir), "data": str(args.data or "model's test split"),
        "settings": {"threads": threads, "repeats": args.repeats, "latency_sentences": len(latency),
                     "batch_sentences": len(batch), "bleu_sentences": min(args.bleu_sentences, len(sources)),
                     "finetune_steps": args.finetune_steps, "calibrate_batches": args.calibrate,
                     "distill": args.distill},
        "hardware": hardware(), "versions": package_versions(), "variants": {},
    }
    scored = spread_indices(len(sources), args.bleu_sentences)  # not the first N: test is ordered by length
    for name, path in variants.items():
        print(f"BLEU of {name} ...", flush=True)
        quality = measure_quality(translators[name], [sources[i] for i in scored], [refs[i] for i in scored])
        results["variants"][name] = {
            "path": str(path), "bytes": (resolve_model_dir(path) / "model.safetensors").stat().st_size,
            "weights": stored_weights(path), **quality, **speed[name],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_compression.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = markdown(results)
    (args.out / "bench_compression.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    run_script(main, "bench_compression")  # a bad path or model dir: one line, not a traceback
