"""bf16 attention on the CPU: PyTorch's SDPA kernels against fp32, alone and in a recipe's step.

Part 1 (kernels): forward+backward and forward-only time of
`F.scaled_dot_product_attention` on bf16 q/k/v of (B, 4, T, Dh) with a padding
mask and ~4k tokens per call, for the default bf16 kernel (flash), the math
kernel, and the inputs upcast to fp32 (what `trainformer.nn.attention.sdpa`
does). Part 2 (steps): the trainer's own step on each recipe's batch stream
(its precision: bf16 on CPUs with native bf16), the upcast on and off in
alternating blocks. Variants are interleaved in one process after a warm-up;
medians are reported.

    python benchmarks/speed/bench_attention.py [--recipes translate-en-fr translate-en-fr-60min]
        [--rounds 5] [--out benchmarks/results/attention]
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainformer.bench.recipe_steps import (
    ab_parser,
    ab_result,
    alternating_blocks,
    recipe_trainer,
    steps_markdown,
    write_ab_result,
)
from trainformer.bench.timing import interleaved, timed
from trainformer.errors import run_script
from trainformer.nn.attention import MultiHeadAttention
from trainformer.paths import REPO_ROOT

KERNELS = ("bf16 flash", "bf16 math", "fp32 upcast")


def attention_call(kernel: str, t: int, dh: int, backward: bool, tokens: int = 4096, heads: int = 4) -> Callable:
    """One SDPA call (and its backward) on fresh bf16 tensors of ~`tokens` query tokens."""
    b = max(1, tokens // t)
    q, k, v = (torch.randn(b, heads, t, dh, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
    mask[::2, ..., t // 2:] = False  # every other row half padding

    def run() -> None:
        if kernel == "fp32 upcast":
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
        else:
            with sdpa_kernel(SDPBackend.MATH if kernel == "bf16 math" else SDPBackend.FLASH_ATTENTION):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if backward:
            y.float().sum().backward()

    return run


def median_seconds(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, called in turns (`bench.timing.interleaved`)."""
    cpu = torch.device("cpu")
    runs = {name: (lambda fn=fn: timed(fn, cpu)) for name, fn in fns.items()}
    return {name: statistics.median(ts) for name, ts in interleaved(runs, rounds, warmup).items()}


def bench_kernels(rounds: int) -> list[dict]:
    rows = []
    for backward in (True, False):
        for dh in (32, 64):
            for t in (8, 16, 32, 64, 128, 256, 512):
                fns = {k: attention_call(k, t, dh, backward) for k in KERNELS}
                ms = {k: round(v * 1e3, 2) for k, v in median_seconds(fns, rounds).items()}
                rows.append({"backward": backward, "head_dim": dh, "T": t, "ms": ms})
                print(f"{'fwd+bwd' if backward else 'fwd'} Dh={dh} T={t}: {ms}", flush=True)
    return rows


def set_upcast(model: torch.nn.Module, upcast: bool) -> None:
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.cpu_bf16_in_fp32 = upcast


def bench_steps(recipes: list[str], rounds: int, out: Path, steps: int = 25) -> list[dict]:
    """The trainer's own `train_step` on the recipe's batch stream, upcast on and off in
    alternating blocks of `steps` steps (`bench.recipe_steps.alternating_blocks`)."""
    rows = []
    for recipe in recipes:
        trainer = recipe_trainer(recipe, out)
        model = trainer.module
        variants = {"upcast to fp32": lambda m=model: set_upcast(m, True),
                    "SDPA as is": lambda m=model: set_upcast(m, False)}
        rows.append({"recipe": recipe, **alternating_blocks(trainer, variants, rounds, steps)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["# bf16 attention on the CPU", "", f"Machine: {result['machine']}; torch {result['versions']['torch']}, "
             f"{result['threads']} threads; {result['date']}.", "",
             "## Kernels (ms per call, ~4k query tokens, 4 heads, padding mask; median of "
             f"{result['rounds']})", "", "| pass | Dh | T | " + " | ".join(KERNELS) + " | best |",
             "|---|---|---|" + "---|" * (len(KERNELS) + 1)]
    for r in result["kernels"]:
        best = min(r["ms"], key=r["ms"].get)
        lines.append(f"| {'fwd+bwd' if r['backward'] else 'fwd'} | {r['head_dim']} | {r['T']} | "
                     + " | ".join(f"{r['ms'][k]:.2f}" for k in KERNELS) + f" | {best} |")
    lines += ["", *steps_markdown(result["steps"], "attention")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = ab_parser(__doc__.splitlines()[0], REPO_ROOT / "benchmarks" / "results" / "attention")
    ap.add_argument("--skip-kernels", action="store_true")
    args = ap.parse_args()
    result = ab_result(args.rounds, kernels=[] if args.skip_kernels else bench_kernels(args.rounds),
                       steps=bench_steps(args.recipes, args.rounds, REPO_ROOT / "bench_out" / "bench_attention"))
    write_ab_result(args.out, "bench_attention", result, markdown(result))


if __name__ == "__main__":
    run_script(main, "bench_attention")
