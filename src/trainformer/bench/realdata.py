"""Useful (non-padding) target tokens/s training on real Tatoeba batches: ours vs HF-typical batching.

Same model (the `translate-en-fr` recipe's), same steps, same precision; only
the batches differ:

    ours        `PairBatches` from the translation task (token budget, length-sorted)
    hf_typical  64 randomly chosen pairs padded to their longest (DataCollatorForSeq2Seq style)

Padding is computed on, so the figure that matters is target tokens carrying
loss per second. Skipped with a message when the shared data is absent.
"""

from __future__ import annotations

import itertools
import time

import torch

from trainformer.bench.timing import interleaved, summarize, sync
from trainformer.config import load_recipe
from trainformer.data.batching import collate_pairs, random_batches
from trainformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from trainformer.errors import DataError
from trainformer.tasks import build_task
from trainformer.training.precision import build_precision


def _hf_typical(task, n_batches: int, size: int) -> list[dict]:
    """`n_batches` batches of `size` random training pairs, padded to their longest."""
    rows = random_batches(len(task.train_index), size, seed=0)[:n_batches]
    keep = task.cfg.data.max_len - 1  # the same truncation as PairBatches
    out = []
    for r in rows:
        fields = task.store.take(task.train_index[r])
        out.append(_collate(fields, keep))
    return out


def _collate(fields: dict, keep: int) -> dict:
    return collate_pairs([s[:keep] for s in fields["src"]], [t[:keep] for t in fields["tgt"]],
                         PAD_ID, BOS_ID, EOS_ID)


def _step_runner(task, model, batches: list[dict], device, precision) -> tuple:
    """A closure training on the next batch of `batches` (cycled); it records useful target tokens."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = build_precision(precision, device).autocast
    cycle = itertools.cycle(batches)
    useful: list[int] = []

    def step() -> float:
        batch = {k: v.to(device) for k, v in next(cycle).items()}
        sync(device)
        t = time.perf_counter()
        with autocast():
            loss, n = task.loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        useful.append(task.loss_tokens(batch))
        return time.perf_counter() - t

    return step, useful


def _batch_stats(batches: list[dict]) -> dict:
    """Mean sentences per batch and the fraction of target positions that are padding."""
    real = sum(int(b["tgt_mask"].sum()) for b in batches)
    padded = sum(b["tgt_mask"].numel() for b in batches)
    return {"mean_sentences": sum(len(b["tgt_mask"]) for b in batches) / len(batches),
            "tgt_padding_fraction": 1 - real / padded}


def bench_realdata(device: torch.device, precision: str, steps: int, warmup: int = 2,
                   max_tokens: int | None = None) -> dict:
    """Useful target tokens/s of our batches vs HF-typical ones ({"skipped": why} without the data).

    Args:
        max_tokens: our token budget per batch (None: the recipe's 6000).
    """
    overrides = ["model.dropout=0.0"] + ([f"data.max_tokens={max_tokens}"] if max_tokens else [])
    cfg = load_recipe("translate-en-fr", overrides)
    task = build_task(cfg)
    try:
        task.setup(None)
    except DataError as e:
        return {"skipped": f"shared data absent: {e}"}
    ours_batches = list(itertools.islice(iter(task.train_batches()), warmup + steps))
    hf_batches = _hf_typical(task, warmup + steps, 64)
    runs, useful = {}, {}
    for name, batches in (("ours", ours_batches), ("hf_typical", hf_batches)):
        torch.manual_seed(0)
        model = task.build_model().to(device).train()
        runs[name], useful[name] = _step_runner(task, model, batches, device, precision)
    times = interleaved(runs, steps, warmup)
    out: dict = {"model": "translate-en-fr recipe", "steps": steps, "max_tokens": cfg.data.max_tokens}
    for name, t in times.items():
        tokens = sum(useful[name][warmup:])
        batches = ours_batches if name == "ours" else hf_batches
        out[name] = {**summarize(t), **_batch_stats(batches), "useful_tgt_tokens": tokens,
                     "useful_tokens_per_s": tokens / sum(t)}
    out["speedup"] = out["ours"]["useful_tokens_per_s"] / out["hf_typical"]["useful_tokens_per_s"]
    return out
