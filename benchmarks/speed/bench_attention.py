"""bf16 attention on the CPU: our kernels against PyTorch's SDPA, alone and in a recipe's step.

Part 1 (kernels): forward+backward and forward-only time of attention on bf16
q/k/v of (B, 4, T, Dh) with ~4k query tokens per call, with a padding mask
(every other row half padding) and causal, for SDPA's default bf16 kernel
(flash), its math kernel, the inputs upcast to fp32 (``cpu_bf16="fp32"`` of
`trainformer.nn.attention.sdpa`) and two bf16 batched GEMMs around a softmax
(`matmul_attention`, what ``"auto"`` takes where `matmul_pays`).
Part 2 (steps): the trainer's own step on each recipe's batch stream (its
precision: bf16 on CPUs with native bf16), ``"auto"`` and ``"fp32"`` in
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
from trainformer.nn.attention import (
    MATMUL_MAX_KEYS,
    MultiHeadAttention,
    matmul_attention,
)
from trainformer.paths import REPO_ROOT

KERNELS = ("bf16 flash", "bf16 math", "fp32 upcast", "bf16 matmul")


def attention_call(kernel: str, t: int, dh: int, backward: bool, causal: bool, tokens: int = 4096,
                   heads: int = 4) -> Callable:
    """One attention call (and its backward) on fresh bf16 tensors of ~`tokens` query tokens."""
    b = max(1, tokens // t)
    q, k, v = (torch.randn(b, heads, t, dh, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    mask = None
    if not causal:
        mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
        mask[::2, ..., t // 2:] = False  # every other row half padding

    def run() -> None:
        if kernel == "fp32 upcast":
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               is_causal=causal).bfloat16()
        elif kernel == "bf16 matmul":
            y = matmul_attention(q, k, v, mask, is_causal=causal)
        else:
            with sdpa_kernel(SDPBackend.MATH if kernel == "bf16 math" else SDPBackend.FLASH_ATTENTION):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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
        for causal in (False, True):
            for dh in (32, 64):
                for t in (8, 16, 32, 64, 128, 256, 512):
                    fns = {k: attention_call(k, t, dh, backward, causal) for k in KERNELS}
                    ms = {k: round(v * 1e3, 2) for k, v in median_seconds(fns, rounds).items()}
                    rows.append({"backward": backward, "causal": causal, "head_dim": dh, "T": t, "ms": ms})
                    print(f"{'fwd+bwd' if backward else 'fwd'} {'causal' if causal else 'padding'} "
                          f"Dh={dh} T={t}: {ms}", flush=True)
    return rows


def set_mode(model: torch.nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.cpu_bf16 = mode


def bench_steps(recipes: list[str], rounds: int, out: Path, steps: int = 25) -> list[dict]:
    """The trainer's own `train_step` on the recipe's batch stream, ``cpu_bf16`` "auto" and "fp32"
    in alternating blocks of `steps` steps (`bench.recipe_steps.alternating_blocks`)."""
    rows = []
    for recipe in recipes:
        trainer = recipe_trainer(recipe, out)
        model = trainer.module
        variants = {"auto (bf16 matmul)": lambda m=model: set_mode(m, "auto"),
                    "fp32 upcast": lambda m=model: set_mode(m, "fp32")}
        rows.append({"recipe": recipe, **alternating_blocks(trainer, variants, rounds, steps)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["# bf16 attention on the CPU", "", f"Machine: {result['machine']}; torch {result['versions']['torch']}, "
             f"{result['threads']} threads; {result['date']}.", "",
             "## Kernels (ms per call, ~4k query tokens, 4 heads; median of "
             f"{result['rounds']})", "", f"\"auto\" (`matmul_pays`) takes bf16 matmul up to {MATMUL_MAX_KEYS} keys, fp32 upcast above.",
             "", "| pass | mask | Dh | T | " + " | ".join(KERNELS) + " | best |",
             "|---|---|---|---|" + "---|" * (len(KERNELS) + 1)]
    for r in result["kernels"]:
        best = min(r["ms"], key=r["ms"].get)
        lines.append(f"| {'fwd+bwd' if r['backward'] else 'fwd'} | {'causal' if r['causal'] else 'padding'} | "
                     f"{r['head_dim']} | {r['T']} | "
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
