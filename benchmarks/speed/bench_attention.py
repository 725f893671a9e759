"""bf16 attention on the CPU: PyTorch's SDPA kernels against fp32, alone and in a recipe's step.

Part 1 (kernels): forward+backward and forward-only time of
`F.scaled_dot_product_attention` on bf16 q/k/v of (B, 4, T, Dh) with a padding
mask and ~4k tokens per call, for the default bf16 kernel (flash), the math
kernel, and the inputs upcast to fp32 (what `trainformer.nn.attention.sdpa`
does). Part 2 (steps): the training step of each recipe (real batches, bf16
autocast, fused AdamW) with the upcast on and off, and in fp32. Variants are
interleaved in one process after a warm-up; medians are reported.

    python benchmarks/speed/bench_attention.py [--recipes translate-en-fr translate-en-fr-60min]
        [--rounds 5] [--out benchmarks/results/attention]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainformer.config import load_recipe
from trainformer.errors import run_script
from trainformer.nn.attention import MultiHeadAttention
from trainformer.paths import REPO_ROOT
from trainformer.rundir import machine_line, package_versions
from trainformer.tasks import build_task
from trainformer.training.optim import build_optimizer

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


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, run in turns (round-robin) after `warmup` turns."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            dt = seconds(fn)
            if r >= warmup:
                times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_kernels(rounds: int) -> list[dict]:
    rows = []
    for backward in (True, False):
        for dh in (32, 64):
            for t in (8, 16, 32, 64, 128, 256, 512):
                fns = {k: attention_call(k, t, dh, backward) for k in KERNELS}
                ms = {k: round(v * 1e3, 2) for k, v in interleaved(fns, rounds).items()}
                rows.append({"backward": backward, "head_dim": dh, "T": t, "ms": ms})
                print(f"{'fwd+bwd' if backward else 'fwd'} Dh={dh} T={t}: {ms}", flush=True)
    return rows


def step_runner(recipe: str, precision: str, upcast: bool, n_batches: int) -> Callable:
    """A callable running one training step of `recipe` per call, cycling over its first batches."""
    cfg = load_recipe(recipe)
    task = build_task(cfg)
    task.setup(REPO_ROOT / "bench_out" / "bench_attention" / recipe, 0, 1)
    batches = [b for b, _ in zip(task.train_batches(), range(n_batches))]
    torch.manual_seed(0)
    model = task.build_model().train()
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.cpu_bf16_in_fp32 = upcast
    optimizer = build_optimizer(model, cfg.optim)
    state = {"i": 0}

    def step() -> int:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        with autocast:
            loss, n = task.loss(model, batch)
        (loss.float() / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return task.batch_tokens(batch)

    return step


def bench_steps(recipes: list[str], rounds: int, n_batches: int = 24) -> list[dict]:
    rows = []
    variants = {"bf16, attention upcast to fp32": ("bf16", True), "bf16, SDPA as is": ("bf16", False),
                "fp32": ("fp32", True)}
    for recipe in recipes:
        runners = {name: step_runner(recipe, *v, n_batches) for name, v in variants.items()}
        # one "call" = a pass over all batches, so every variant sees the same shapes
        passes = {name: (lambda r=r: [r() for _ in range(n_batches)]) for name, r in runners.items()}
        tokens = sum(runners["fp32"]() for _ in range(n_batches))  # also a warm-up pass
        med = interleaved(passes, rounds, warmup=1)
        row = {"recipe": recipe, "batches": n_batches,
               "tokens_per_s": {k: round(tokens / v) for k, v in med.items()},
               "ms_per_step": {k: round(v / n_batches * 1e3, 1) for k, v in med.items()}}
        base = med["bf16, SDPA as is"]
        row["speedup_vs_bf16_as_is"] = {k: round(base / v, 2) for k, v in med.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
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
    lines += ["", "## Training steps (real batches of each recipe)", "",
              "| recipe | variant | ms/step | tokens/s | speed-up vs bf16 SDPA as is |", "|---|---|---|---|---|"]
    for r in result["steps"]:
        for k in r["ms_per_step"]:
            lines.append(f"| {r['recipe']} | {k} | {r['ms_per_step'][k]} | {r['tokens_per_s'][k]:,} | "
                         f"{r['speedup_vs_bf16_as_is'][k]:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=["translate-en-fr", "translate-en-fr-60min"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "attention")
    args = ap.parse_args()
    result = {"machine": machine_line(), "versions": package_versions(), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
              "kernels": [] if args.skip_kernels else bench_kernels(args.rounds),
              "steps": bench_steps(args.recipes, args.rounds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_attention.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "bench_attention.md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {args.out / 'bench_attention.md'}")


if __name__ == "__main__":
    run_script(main, "bench_attention")
