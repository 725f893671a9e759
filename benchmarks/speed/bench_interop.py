"""One translation model in every runtime it exports to: sentences/s and BLEU, interleaved in one process.

    python benchmarks/speed/bench_interop.py MODEL_DIR [--sentences 512] [--latency-sentences 48]
        [--threads 1 2] [--repeats 2] [--out benchmarks/results/interop]

Engines, all on the CPU and all from MODEL_DIR (``--bf16`` adds ours and HF
under bf16 autocast, for CPUs with native bf16; CTranslate2 has no bf16 on the
CPU): ours (PyTorch fp32, and the
int8 model of ``trainformer quantize --method dynamic``), Hugging Face
``generate()`` on the ``--to hf`` export, onnxruntime on the ``--to onnx``
export (greedy only: our ONNX runner has no beam search), and CTranslate2
float32 and int8 on the ``--to ctranslate2`` export.

Every engine translates the same test sentences (spread over the model's own
test split, short to long) in the same chunks: batch 32 = 32 sentences of
similar length, batch 1 = one at a time. The length limit is ours
(``eval.max_len_a * source length + eval.max_len_b``): ours and ONNX apply it
per sentence, HF and CTranslate2 take one limit per call, the chunk's
largest. Beam search uses each engine's own length normalisation at
``eval.length_penalty`` (GNMT for ours, length ** alpha for HF and
CTranslate2), so beam outputs may differ slightly; BLEU says by how much.
One warm-up chunk per engine, then `--repeats` timed passes, engines
interleaved inside each pass; medians. Torch, onnxruntime and CTranslate2
get the same thread count.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainformer.bench.report import write_table_report
from trainformer.bench.testset import (
    chunk_translator,
    length_chunks,
    spread_by_length,
    translation_test_set,
)
from trainformer.errors import run_script
from trainformer.generation.greedy import length_limits
from trainformer.modeldir import resolve_model_dir
from trainformer.rundir import hardware, machine_line, package_versions
from trainformer.tasks.translation import score_translations

Engine = Callable[[list[str], int], list[str]]  # (sentences of one chunk, beam) -> translations
BATCHES = (32, 1)
BEAMS = (1, 4)


# ----------------------------------------------------------------------------
# The exports
# ----------------------------------------------------------------------------


DEFAULT_OUT = Path("benchmarks/results/interop")


def export_all(model_dir: Path, work: Path) -> dict[str, Path]:
    """Every export of `model_dir` under `work`, made with the same commands a user runs."""
    from trainformer.cli import main

    dirs = {name: work / name for name in ("int8", "hf", "onnx", "ct2-float32", "ct2-int8")}
    commands = [
        ["quantize", str(model_dir), "--out", str(dirs["int8"]), "--method", "dynamic"],
        ["export", str(model_dir), "--to", "hf", "--out", str(dirs["hf"])],
        ["export", str(model_dir), "--to", "onnx", "--out", str(dirs["onnx"])],
        ["export", str(model_dir), "--to", "ctranslate2", "--out", str(dirs["ct2-float32"])],
        ["export", str(model_dir), "--to", "ctranslate2", "--out", str(dirs["ct2-int8"]), "--quantization", "int8"],
    ]
    for command in commands:
        if main(command) != 0:
            raise SystemExit(f"bench_interop: `trainformer {' '.join(command)}` failed")
    return dirs


# ----------------------------------------------------------------------------
# Engines: each translates one chunk with `threads` threads
# ----------------------------------------------------------------------------


def chunk_limit(translator, sentences: list[str]) -> int:
    """The largest of our per-sentence length limits in a chunk (for engines that take one per call)."""
    encoded = translator._encode(sentences)
    lengths = torch.tensor([len(e) for e in encoded])
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (N, S)
    e = translator.cfg.eval
    return max(length_limits(mask, mask, translator.cfg.model.max_len, None, e.max_len_a, e.max_len_b))


def ours(model_dir: Path, precision: str = "fp32") -> Callable[[int], Engine]:
    translator = chunk_translator(model_dir, precision)

    def make(threads: int) -> Engine:
        return lambda chunk, beam: [h[0] for h in translator.translate(chunk, beam=beam)]

    return make


def hf_generate(hf_dir: Path, reference, bf16: bool = False) -> Callable[[int], Engine]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()

    def translate(chunk: list[str], beam: int) -> list[str]:
        batch = tokenizer(chunk, return_tensors="pt", padding=True)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(**batch, num_beams=beam, do_sample=False,
                                 max_new_tokens=chunk_limit(reference, chunk), max_length=None)
        return tokenizer.batch_decode(out, skip_special_tokens=True)

    return lambda threads: translate


def onnx_greedy(onnx_dir: Path) -> Callable[[int], Engine]:
    from trainformer.interop.onnx_export import OnnxTranslator

    def make(threads: int) -> Engine:
        runner = OnnxTranslator(onnx_dir, threads=threads)

        def translate(chunk: list[str], beam: int) -> list[str]:
            if beam != 1:
                raise NotImplementedError
            return runner.translate(chunk)

        return translate

    return make


def ct2(ct2_dir: Path, reference) -> Callable[[int], Engine]:
    from trainformer.inference.translator import encode_sources
    from trainformer.interop.ct2 import load_ct2_translator

    def make(threads: int) -> Engine:
        ct = load_ct2_translator(ct2_dir, "cpu", threads)

        def translate(chunk: list[str], beam: int) -> list[str]:
            encoded, _ = encode_sources(ct.tokenizer, chunk, ct.max_src)
            tokens = [[ct.tokenizer.id_to_token(t) for t in ids] for ids in encoded]
            outs = ct.translator.translate_batch(
                tokens, max_decoding_length=chunk_limit(reference, chunk), beam_size=beam,
                length_penalty=reference.cfg.eval.length_penalty, return_end_token=True,
                max_batch_size=0, return_scores=False)
            return [ct._detokenize(o.hypotheses[0]) for o in outs]

        return translate

    return make


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def run_pass(engine: Engine, parts: list[list[str]], beam: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = [t for part in parts for t in engine(part, beam)]
    return time.perf_counter() - start, out


def measure(engines: dict[str, Callable[[int], Engine]], sentences: dict[int, list[str]], threads: int,
            repeats: int) -> dict[str, dict[str, Any]]:
    """Sentences/s of every engine at every (batch, beam), interleaved; the outputs of the last pass."""
    torch.set_num_threads(threads)
    built = {name: make(threads) for name, make in engines.items()}
    results: dict[str, dict[str, Any]] = {name: {} for name in built}
    for batch in BATCHES:
        parts = length_chunks(sentences[batch], batch)
        for beam in BEAMS:
            key = f"b{batch}-beam{beam}"
            live = {}
            for name, engine in built.items():  # warm-up, and drop what an engine cannot do
                try:
                    engine(parts[len(parts) // 2], beam)
                    live[name] = engine
                except NotImplementedError:
                    continue
            times: dict[str, list[float]] = {name: [] for name in live}
            outputs: dict[str, list[str]] = {}
            for _ in range(repeats):
                for name, engine in live.items():
                    seconds, outputs[name] = run_pass(engine, parts, beam)
                    times[name].append(seconds)
            for name in live:
                n = len(sentences[batch])
                results[name][key] = {"sent_per_s": round(n / statistics.median(times[name]), 1),
                                      "outputs": outputs[name], "sources": [s for p in parts for s in p]}
            print(f"threads {threads} {key}: " + ", ".join(
                f"{name} {results[name][key]['sent_per_s']}" for name in live), flush=True)
    return results


def bleu_of(outputs: list[str], sources: list[str], refs: dict[str, list[str]]) -> float:
    return float(score_translations(outputs, [refs[s] for s in sources])["bleu"])


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--sentences", type=int, default=512, help="test sentences for batch 32")
    p.add_argument("--latency-sentences", type=int, default=48, help="test sentences for batch 1")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="add ours, HF and CTranslate2 in bf16")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    model_dir = resolve_model_dir(args.model_dir)
    sources, references = translation_test_set(model_dir)
    refs = dict(zip(sources, references))
    sentences = {32: spread_by_length(sources, args.sentences), 1: spread_by_length(sources, args.latency_sentences)}
    with tempfile.TemporaryDirectory() as work:
        dirs = export_all(model_dir, Path(work))
        from trainformer.inference.loading import load_translator

        reference = load_translator(model_dir, "cpu", "fp32")
        engines = {"ours": ours(model_dir), "ours int8": ours(dirs["int8"]),
                   "HF generate": hf_generate(dirs["hf"], reference), "onnxruntime": onnx_greedy(dirs["onnx"]),
                   "CTranslate2 float32": ct2(dirs["ct2-float32"], reference),
                   "CTranslate2 int8": ct2(dirs["ct2-int8"], reference)}
        if args.bf16:  # bf16 autocast on CPUs that have it (AVX512-BF16 / AMX); CTranslate2 has no CPU bf16
            engines.update({"ours bf16": ours(model_dir, "bf16"),
                            "HF generate bf16": hf_generate(dirs["hf"], reference, bf16=True)})
        by_threads = {t: measure(engines, sentences, t, args.repeats) for t in args.threads}
    write_report(args, model_dir, by_threads, refs)


def write_report(args, model_dir: Path, by_threads: dict[int, dict], refs: dict[str, list[str]]) -> None:
    keys = [f"b{b}-beam{k}" for b in BATCHES for k in BEAMS]
    header = ["engine", "threads", *[f"{k} sent/s" for k in keys], "BLEU greedy", "BLEU beam 4"]
    rows, table = [], {}
    for threads, results in by_threads.items():
        for name, cells in results.items():
            bleu = {beam: bleu_of(cells[f"b32-beam{beam}"]["outputs"], cells[f"b32-beam{beam}"]["sources"], refs)
                    for beam in BEAMS if f"b32-beam{beam}" in cells}
            base = by_threads[threads]["ours"]
            speeds = []
            for k in keys:
                if k not in cells:
                    speeds.append("—")
                    continue
                ratio = cells[k]["sent_per_s"] / base[k]["sent_per_s"]
                speeds.append(f"{cells[k]['sent_per_s']} ({ratio:.2f}x)")
            rows.append([name, str(threads), *speeds, *(f"{bleu[b]:.2f}" if b in bleu else "—" for b in BEAMS)])
            table[f"{name} / {threads}"] = {k: cells[k]["sent_per_s"] for k in keys if k in cells} | {
                f"bleu_beam{b}": v for b, v in bleu.items()}
    from trainformer.modeldir import read_model_config

    cfg, hw = read_model_config(model_dir), hardware()
    intro = [
        f"Model: the `{cfg.name}` recipe's ({cfg.model.n_layers}+{cfg.model.n_decoder_layers or cfg.model.n_layers} "
        f"layers, d_model {cfg.model.d_model}, vocabulary {cfg.model.vocab_size}). {args.sentences} test sentences at batch 32 and {args.latency_sentences} at "
        f"batch 1 (spread over the test split, short to long); BLEU on the batch-32 sentences. "
        f"In brackets: the ratio to ours (PyTorch fp32) at the same threads. {args.repeats} timed passes "
        "after a warm-up, engines interleaved; medians.",
        f"Machine: {machine_line(hw)}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()) + ".",
        "Command: `python benchmarks/speed/bench_interop.py " + " ".join(
            [str(args.model_dir), "--sentences", str(args.sentences), "--latency-sentences",
             str(args.latency_sentences), "--threads", *map(str, args.threads), "--repeats", str(args.repeats)]
            + (["--bf16"] if args.bf16 else []) + (["--out", str(args.out)] if args.out != DEFAULT_OUT else [])) + "`",
    ]
    results = {"hardware": hardware(), "versions": package_versions(), "results": table}
    print(write_table_report(args.out, "bench_interop", results, "Decoding in every runtime", intro, header, rows))


if __name__ == "__main__":
    run_script(main, "bench_interop")
