"""Where the time of batch-1 greedy translation goes, per model directory.

Batch-1 decoding multiplies one row of activations by every weight matrix of
the decoder and by the output head at each generated token. Whether that is
bound by operator overhead, by arithmetic or by moving the weights from
memory decides which compression can speed it up. For each model dir
(fp32, pruned, int8 ...) this reports, interleaved and as medians:

- milliseconds per generated token (test sentences spread over lengths);
- from `torch.profiler`, the share of that time spent in matrix multiplies
  (linear / addmm / mm / quantized linear) and their mean time per call;
- the bytes of weights one decoding step reads: decoder layers and output
  head (the encoder and the cross-attention K/V run once per sentence).

and, for the machine: copy bandwidth, and one fp32 decoder-shaped linear
(M = 1) timed with its weights in cache ("hot") and after the caches are
flushed ("cold"). The first model also runs a second time with its tied
output head on `F.linear` ("head via F.linear"), the path used before the
head multiplied by a cached (D, V) transpose at decoding (see
`TokenEmbedding.attend`), so the two are compared in the same process.

    python benchmarks/speed/bench_decode_profile.py runs/en-fr-60/model [MORE_MODEL_DIRS ...]
        [--threads 1] [--sentences 12] [--repeats 3] [--out benchmarks/results/decode_profile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from trainformer.bench.report import write_table_report
from trainformer.bench.testset import spread_by_length, translation_test_set
from trainformer.cli.common import require_positive
from trainformer.errors import run_script
from trainformer.inference.loading import load_translator
from trainformer.modeldir import resolve_model_dir
from trainformer.models.quantized import dynamic_int8
from trainformer.rundir import hardware, machine_line, package_versions

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "quantized::linear_dynamic", "aten::_weight_int8pack_mm")


def median_us(fn, n: int = 200, before=None) -> float:
    """Median microseconds of `fn()` over n calls (after 10 warm-up calls); `before()` runs untimed."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - start))
    return statistics.median(times)


@torch.inference_mode()
def machine_memory() -> dict[str, Any]:
    """Copy bandwidth (GB/s, read + write); a (768 x 192) fp32 linear at M = 1, hot and cold;
    the same linear at M = 256 in fp32 and as torch.ao's dynamic int8, and the SIMD level
    PyTorch found (int8 GEMMs outrun fp32 ones only with VNNI / AMX instructions)."""
    src = torch.randn(16 * 2**20)  # 64 MiB, far above any cache
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = median_us(lambda: dst.copy_(src), n=10) / 1e6
    weight, x = torch.randn(768, 192), torch.randn(1, 192)
    flush = torch.empty(8 * 2**20)  # 32 MiB written between calls evicts the weight
    linear = torch.nn.Linear(192, 768)
    int8 = dynamic_int8(torch.nn.Sequential(copy.deepcopy(linear)))
    rows = torch.randn(256, 192)
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "copy_gb_per_s": round(2 * src.numel() * 4 / copy_s / 1e9, 2),
        "linear_768x192_hot_us": round(median_us(lambda: F.linear(x, weight)), 1),
        "linear_768x192_cold_us": round(median_us(lambda: F.linear(x, weight), before=lambda: flush.fill_(1.0)), 1),
        "linear_768x192_m256_fp32_us": round(median_us(lambda: linear(rows), n=50), 1),
        "linear_768x192_m256_int8_us": round(median_us(lambda: int8(rows), n=50), 1),
    }


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: the decoder layers, less the cross-attention
    K/V projection (run once per sentence), and the output head."""
    total = 0
    for name, m in model.decoder_layers.named_modules():
        if "cross_attn.kv" in name:
            continue
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if hasattr(m, "_weight_bias") and not name.endswith("_packed_params"):  # torch.ao's int8 Linear
            tensors += [t for t in m._weight_bias() if t is not None]
        total += sum(t.numel() * t.element_size() for t in tensors)
    head = model.lm_head if getattr(model, "lm_head", None) is not None else model.tok_embed
    return total + sum(t.numel() * t.element_size() for t in [*head.parameters(), *head.buffers()])


def per_token_ms(tr, sentences: list[str]) -> list[float]:
    """Per sentence: wall milliseconds of batch-1 greedy translation / tokens generated (EOS included)."""
    out = []
    for s in sentences:
        start = time.perf_counter()
        text = tr.translate([s], beam=1)[0][0]
        ms = 1000 * (time.perf_counter() - start)
        out.append(ms / (len(tr.tokenizer.encode_batch([text])[0]) + 1))
    return out


def matmul_share(tr, sentences: list[str]) -> dict[str, float]:
    """Share of profiled CPU time in matrix multiplies, and their mean microseconds per call."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in sentences:
            tr.translate([s], beam=1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = [e for e in events if e.key in MATMUL_OPS]
    mm_time, mm_calls = sum(e.self_cpu_time_total for e in mm), sum(e.count for e in mm)
    return {"matmul_share": round(mm_time / max(total, 1), 3), "matmul_us_per_call": round(mm_time / max(mm_calls, 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sentences", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_profile"))
    args = ap.parse_args()
    require_positive(ap, args, "sentences", "repeats", "threads")
    torch.set_num_threads(args.threads)
    dirs = [resolve_model_dir(d) for d in args.model_dirs]
    sources, _ = translation_test_set(dirs[0])
    sentences = spread_by_length(sources, args.sentences)
    translators = {d.name if d.name != "model" else d.parent.name: load_translator(d, "cpu", "fp32") for d in dirs}
    slow = f"{next(iter(translators))}, head via F.linear"
    translators[slow] = load_translator(dirs[0], "cpu", "fp32")
    translators[slow].model.tok_embed.fast_head.max_rows = 0  # this copy always multiplies by the (V, D) weight
    for tr in translators.values():
        tr.translate(sentences[:2], beam=1)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in translators}
    for _ in range(args.repeats):  # interleaved: every variant sees the same machine state
        for name, tr in translators.items():
            times[name] += per_token_ms(tr, sentences)
    results: dict[str, Any] = {
        "settings": {"threads": args.threads, "sentences": len(sentences), "repeats": args.repeats},
        "machine": machine_memory(), "hardware": hardware(), "versions": package_versions(), "variants": {},
    }
    for name, tr in translators.items():
        share = matmul_share(tr, sentences)
        results["variants"][name] = {
            "ms_per_token": round(statistics.median(times[name]), 3),
            "step_weight_mb": round(step_weight_bytes(tr.model) / 1e6, 2),
            **share,
        }
    m = results["machine"]
    intro = [f"{time.strftime('%Y-%m-%d')}, {machine_line(results['hardware'])}, {args.threads} thread(s), "
             f"{len(sentences)} test sentences x {args.repeats} repeats, medians.",
             f"Machine: copy {m['copy_gb_per_s']} GB/s; a 768x192 fp32 linear at M=1 takes "
             f"{m['linear_768x192_hot_us']} us with its weights in cache, {m['linear_768x192_cold_us']} us "
             f"after a flush. At M=256 it takes {m['linear_768x192_m256_fp32_us']} us in fp32 and "
             f"{m['linear_768x192_m256_int8_us']} us as dynamic int8; PyTorch's SIMD level: "
             f"{m['cpu_capability']}."]
    rows = [[name, f"{v['ms_per_token']:.2f}", f"{v['step_weight_mb']:.1f} MB", f"{100 * v['matmul_share']:.0f}%",
             f"{v['matmul_us_per_call']:.0f}"] for name, v in results["variants"].items()]
    print(write_table_report(args.out, "bench_decode_profile", results, "Batch-1 greedy decoding: where the time goes",
                             intro, ["variant", "ms / token", "weights read per step", "matmul share of op time",
                                     "matmul us / call"], rows))


if __name__ == "__main__":
    run_script(main, "bench_decode_profile")  # a bad path or model dir: one line, not a traceback
