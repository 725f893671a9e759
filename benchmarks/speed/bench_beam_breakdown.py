"""Batched beam-4 decoding on the CPU: where a step's time goes, per model directory.

`bench_interop.py` times whole engines; this script splits ours. Each model dir
(fp32, ``trainformer quantize`` int8, ...) translates test sentences in chunks of
32 of similar length with beam 4 on one thread, as the interop table's "batch 32,
beam 4" column does, with a wall-clock timer around each part of a decoding step:

- the decoder's self-attention and cross-attention, each split into its Linear
  layers (projections) and the rest (the attention itself, the cache append,
  reshapes), the feed-forward, the rest of the layers (norms, residual adds);
- the output head (d_model -> vocabulary), `log_softmax` over the vocabulary (or, with
  the C kernels, each row's log-sum-exp and block maxima), the rest of the beam's
  top-k (`generation.beam.next_candidates`), the cache reorder of the beams;
- the encoder (once per chunk), and what is left: the search's own bookkeeping and tokenising.

With ``--pytorch-kernels`` each model dir runs a second time on PyTorch's kernels
alone, without the C kernels of `trainformer.nn.native` (attention, log-sum-exp and
block maxima of the logits), so the two are compared in the same process. Variants alternate over `--repeats`
passes after a warm-up; the split is the mean over the passes, sentences/s the median. The timers add about a microsecond per
timed call (a few dozen calls per step), so sentences/s is a little below
`bench_interop.py`'s.

    python benchmarks/speed/bench_beam_breakdown.py runs/en-fr-60/model runs/en-fr-60-int8
        [--sentences 256] [--repeats 3] [--data TSV] [--precision fp32] [--pytorch-kernels]
        [--out benchmarks/results/beam-breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
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
from trainformer.cli.common import require_positive
from trainformer.errors import run_script
from trainformer.generation import beam
from trainformer.generation.steppers import EncDecStepper
from trainformer.modeldir import resolve_model_dir
from trainformer.nn import native
from trainformer.rundir import hardware, machine_line, package_versions

BATCH, BEAM = 32, 4
PARTS = ("self-attention projections", "self-attention (rest)", "cross-attention projections",
         "cross-attention (rest)", "feed-forward", "norms and residuals", "output head", "log_softmax (or log-sum-exp)",
         "beam top-k", "cache reorder", "encoder", "the rest (search, tokenising)")


class Timers:
    """Seconds spent inside each wrapped callable, by key (inclusive of what it calls)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, fn: Callable, key: str) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1
        return timed


@contextlib.contextmanager
def instrumented(model: torch.nn.Module, timers: Timers) -> Iterator[None]:
    """Timers around the parts of a step (instance attributes and module globals, restored after)."""
    patches: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, key: str) -> None:
        patches.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, timers.wrap(getattr(obj, name), key))

    for layer in model.decoder_layers:
        patch(layer, "forward", "layers")
        patch(layer.self_attn, "forward", "self")
        patch(layer.cross_attn, "forward", "cross")
        patch(layer.ffn, "forward", "feed-forward")
        for name in ("qkv", "out"):
            patch(getattr(layer.self_attn, name), "forward", "self projections")
        for name in ("q", "out"):
            patch(getattr(layer.cross_attn, name), "forward", "cross projections")
    head = model.lm_head if getattr(model, "lm_head", None) is not None else model.tok_embed
    patch(head, "forward" if head is getattr(model, "lm_head", None) else "attend", "output head")
    patch(model, "encode", "encoder")
    patch(beam, "next_candidates", "candidates")
    patch(torch, "log_softmax", "normalise")  # beam search's only caller during these passes
    patch(native, "logsumexp_block_max", "normalise")  # what replaces it where the C kernels are built
    for name in ("select", "expand"):
        patch(EncDecStepper, name, "cache reorder")
    patch(EncDecStepper, "logits", "steps")
    try:
        yield
    finally:
        for obj, name, old in reversed(patches):
            if old is None:
                delattr(obj, name)  # back to the class's own (or the module's) attribute
            else:
                setattr(obj, name, old)


def split(timers: Timers, total: float) -> dict[str, float]:
    """Inclusive timers -> the exclusive parts of `PARTS` (seconds), their sum = `total`."""
    t = timers.seconds
    parts = {
        "self-attention projections": t["self projections"],
        "self-attention (rest)": t["self"] - t["self projections"],
        "cross-attention projections": t["cross projections"],
        "cross-attention (rest)": t["cross"] - t["cross projections"],
        "feed-forward": t["feed-forward"],
        "norms and residuals": t["layers"] - t["self"] - t["cross"] - t["feed-forward"],
        "output head": t["output head"],
        "log_softmax (or log-sum-exp)": t["normalise"],
        "beam top-k": t["candidates"] - t["normalise"],
        "cache reorder": t["cache reorder"],
        "encoder": t["encoder"],
    }
    parts["the rest (search, tokenising)"] = total - sum(parts.values())
    return parts


def timed_pass(translator, parts: list[list[str]], pytorch_kernels: bool = False) -> tuple[float, Timers]:
    timers = Timers()
    off = native.disabled() if pytorch_kernels else contextlib.nullcontext()
    with instrumented(translator.model, timers), off:
        start = time.perf_counter()
        for chunk in parts:
            translator.translate(chunk, beam=BEAM)
        seconds = time.perf_counter() - start
    return seconds, timers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", nargs="+", type=Path)
    ap.add_argument("--sentences", type=int, default=256, help="test sentences, spread over lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, help="a TSV of source / reference pairs instead of the model's test split")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="decode in fp32, or under bf16 autocast (the default of batched CPU decoding where bf16 is native)")
    ap.add_argument("--pytorch-kernels", action="store_true",
                    help="also run each model dir on PyTorch's kernels alone (the C kernels off)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/beam-breakdown"))
    args = ap.parse_args()
    require_positive(ap, args, "sentences", "repeats")
    torch.set_num_threads(1)
    dirs = [resolve_model_dir(d) for d in args.model_dirs]
    sources, _ = translation_test_set(dirs[0], args.data)
    chunks = length_chunks(spread_by_length(sources, args.sentences), BATCH)
    n_sentences = sum(map(len, chunks))
    translators = {}  # name -> (translator, on PyTorch's kernels alone)
    for d in dirs:
        tr = chunk_translator(d, args.precision)
        tr.translate(chunks[len(chunks) // 2], beam=BEAM)  # warm-up
        name = d.name if d.name != "model" else d.parent.name
        translators[name] = (tr, False)
        if args.pytorch_kernels:
            translators[f"{name}, PyTorch kernels"] = (tr, True)
    passes: dict[str, list[tuple[float, Timers]]] = {k: [] for k in translators}
    for _ in range(args.repeats):  # interleaved: every variant sees the same machine state
        for name, (tr, pytorch_kernels) in translators.items():
            passes[name].append(timed_pass(tr, chunks, pytorch_kernels))
    results: dict[str, Any] = {"settings": {"threads": 1, "sentences": n_sentences, "batch": BATCH, "beam": BEAM,
                                            "repeats": args.repeats, "precision": args.precision,
                                            "c_kernels": native.available()},
                               "hardware": hardware(), "versions": package_versions(), "variants": {}}
    for name, runs in passes.items():
        steps = statistics.mean(timers.calls["steps"] for _, timers in runs)
        mean_parts = {p: statistics.mean(split(timers, s)[p] for s, timers in runs) for p in PARTS}
        results["variants"][name] = {
            "sent_per_s": round(n_sentences / statistics.median(s for s, _ in runs), 1),
            "steps_per_pass": round(steps), "ms_per_step": {p: round(1e3 * v / steps, 3) for p, v in mean_parts.items()},
        }
    names = list(results["variants"])
    rows = []
    for p in PARTS:
        cells = []
        for name in names:
            v = results["variants"][name]["ms_per_step"]
            cells.append(f"{v[p]:.3f} ({100 * v[p] / sum(v.values()):.0f}%)")
        rows.append([p, *cells])
    rows.append(["**step**", *(f"**{sum(results['variants'][n]['ms_per_step'].values()):.3f}**" for n in names)])
    intro = [f"{time.strftime('%Y-%m-%d')}, {machine_line(results['hardware'])}; torch "
             f"{results['versions']['torch']}, 1 thread, {args.precision}. {n_sentences} test sentences in chunks of {BATCH} of "
             f"similar length, beam {BEAM}; {args.repeats} pass(es) per model dir, alternating, after a warm-up.",
             "Sentences/s (median, with the timers on): " + ", ".join(
                 f"{n} {results['variants'][n]['sent_per_s']}" for n in names)
             + "; decoder steps per pass: " + ", ".join(
                 f"{n} {results['variants'][n]['steps_per_pass']}" for n in names) + ".",
             "Command: `python benchmarks/speed/bench_beam_breakdown.py " + " ".join(map(str, args.model_dirs))
             + f" --sentences {args.sentences} --repeats {args.repeats}" + (f" --data {args.data}" if args.data else "")
             + (f" --precision {args.precision}" if args.precision != "fp32" else "")
             + (" --pytorch-kernels" if args.pytorch_kernels else "") + "`",
             "Decoding: " + ("with the C kernels of `trainformer.nn.native` (attention; log-sum-exp and block "
                             "maxima in place of log_softmax)" if native.available()
                             else "on PyTorch's kernels (the C kernels are not built here)") + ".", "",
             "Milliseconds per decoder step (mean over the passes), share of the step in brackets:"]
    print(write_table_report(args.out, "bench_beam_breakdown", results, "Batched beam-4 decoding: where a step goes",
                             intro, ["part of a step", *names], rows))


if __name__ == "__main__":
    run_script(main, "bench_beam_breakdown")  # a bad path or model dir: one line, not a traceback
