"""The training loss on the CPU: autograd's F.cross_entropy against ours, alone and in a recipe's step.

Part 1 (the loss alone): forward + backward of the summed, label-smoothed
cross-entropy on random logits of a recipe batch's shape (rows x vocabulary,
bf16 and fp32), ``F.cross_entropy(logits.float(), ...)`` as autograd runs it
against `trainformer.training.loss.SoftmaxCrossEntropy` (the gradient written
in the forward pass) on its two kernels: the C kernel (`nn.native.softmax_xent`,
rows split over torch's threads) and PyTorch ops on blocks of 128 rows. Part 2
(steps): the trainer's own step on each recipe's batch stream, the C kernel and
the PyTorch blocks in alternating blocks, each block in a fresh process
(``--one-process``: all in one). Medians.

    python benchmarks/speed/bench_loss.py [--recipes translate-en-fr translate-en-fr-60min]
        [--rounds 5] [--out benchmarks/results/loss]
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from trainformer.bench.recipe_steps import (
    ab_parser,
    ab_result,
    alternating_blocks,
    alternating_processes,
    recipe_trainer,
    steps_markdown,
    write_ab_result,
)
from trainformer.bench.timing import interleaved, timed
from trainformer.errors import run_script
from trainformer.nn import native
from trainformer.paths import REPO_ROOT
from trainformer.training import loss as loss_module

SHAPES = ((2048, 4000), (2048, 8000), (8192, 8000))  # (target tokens of a batch, vocabulary)
KINDS = ("C kernel", "PyTorch blocks", "F.cross_entropy")


def loss_call(kind: str, rows: int, vocab: int, dtype: torch.dtype):
    """One forward + backward of the summed loss on fresh-gradient logits."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::9] = -100  # some padding

    def run() -> None:
        logits = base.detach().requires_grad_()
        set_kind(kind)
        if kind == "F.cross_entropy":
            total = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=0.1, ignore_index=-100)
        else:
            total = loss_module.SoftmaxCrossEntropy.apply(logits, labels, 0.1)
        total.backward()

    return run


def bench_loss(rounds: int) -> list[dict]:
    cpu = torch.device("cpu")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for n, vocab in SHAPES:
            calls = {k: loss_call(k, n, vocab, dtype) for k in KINDS}
            runs = {k: (lambda fn=fn: timed(fn, cpu)) for k, fn in calls.items()}
            ms = {k: round(statistics.median(v) * 1e3, 2) for k, v in interleaved(runs, rounds, warmup=2).items()}
            rows.append({"dtype": str(dtype).removeprefix("torch."), "rows": n, "vocab": vocab, "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    set_kind(KINDS[0])
    return rows


def set_kind(kind: str) -> None:
    """The CPU training loss on `kind` (one of KINDS) from now on."""
    loss_module.BLOCKWISE_ON_CPU = kind != "F.cross_entropy"
    native._enabled = kind == "C kernel"


def bench_steps(recipes: list[str], rounds: int, out: Path, fresh_processes: bool) -> list[dict]:
    """Each recipe's step with the loss on the C kernel and on PyTorch blocks: alternating blocks
    in one process, or (``fresh_processes``) each block in a fresh process, so no variant runs on
    memory the other one allocated."""
    variants = {k: partial(set_kind, k) for k in KINDS[:2]}
    rows = []
    for recipe in recipes:
        if fresh_processes:
            row = alternating_processes(recipe, out, variants, rounds)
        else:
            row = alternating_blocks(recipe_trainer(recipe, out), variants, rounds)
        rows.append({"recipe": recipe, "processes": "fresh per block" if fresh_processes else "one", **row})
        print(json.dumps(rows[-1]), flush=True)
    set_kind(KINDS[0])
    return rows


def markdown(result: dict) -> str:
    lines = ["# The training loss on the CPU", "", f"Machine: {result['machine']}; torch {result['versions']['torch']}, "
             f"{result['threads']} threads; {result['date']}.", "",
             f"## Forward + backward of the loss (ms per call, label smoothing 0.1; median of {result['rounds']})", "",
             "| logits | rows | vocabulary | " + " | ".join(KINDS) + " | C vs F.cross_entropy | C vs PyTorch blocks |",
             "|---|---|---|" + "---|" * (len(KINDS) + 2)]
    for r in result["loss"]:
        ms = r["ms"]
        lines.append(f"| {r['dtype']} | {r['rows']} | {r['vocab']} | " + " | ".join(f"{ms[k]:.2f}" for k in KINDS)
                     + f" | {ms['F.cross_entropy'] / ms['C kernel']:.2f}x | {ms['PyTorch blocks'] / ms['C kernel']:.2f}x |")
    lines += ["", *steps_markdown(result["steps"], "loss")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = ab_parser(__doc__.splitlines()[0], REPO_ROOT / "benchmarks" / "results" / "loss")
    ap.add_argument("--one-process", action="store_true",
                    help="alternate the steps' variants in one process instead of a fresh process per block")
    args = ap.parse_args()
    result = ab_result(args.rounds, loss=bench_loss(args.rounds),
                       steps=bench_steps(args.recipes, args.rounds, REPO_ROOT / "bench_out" / "bench_loss",
                                         fresh_processes=not args.one_process))
    write_ab_result(args.out, "bench_loss", result, markdown(result))


if __name__ == "__main__":
    run_script(main, "bench_loss")
