"""Padding of token-budget batches vs fixed-size random batches on Tatoeba EN-FR.

Reads the real data (skips with a message when it is absent), trains or
loads the cached joint BPE tokenizer of the default recipe settings,
tokenises every pair once, then compares one epoch of `TokenBudgetSampler`
batches against random batches of a fixed number of sentences. Lengths
include the </s> (source) and <s> (target) that collate adds.

    python benchmarks/speed/bench_padding.py [--max-tokens 4096] [--batch-size 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from trainformer.config import DataConfig
from trainformer.data.batching import TokenBudgetSampler, padding_fraction, random_batches
from trainformer.data.cache import file_hash, tokenize_cached
from trainformer.data.registry import read_dataset
from trainformer.data.tokenizer import load_or_train_tokenizer
from trainformer.errors import DataError
from trainformer.paths import REPO_ROOT
from trainformer.rundir import machine_line


def _stats(batches: list[np.ndarray], lengths: np.ndarray) -> dict[str, float]:
    padded = [len(b) * lengths[b].max(axis=0) for b in batches]  # per batch, per side
    return {
        "padding_fraction": round(padding_fraction(batches, lengths), 4),
        "padding_src": round(padding_fraction(batches, lengths[:, 0]), 4),
        "padding_tgt": round(padding_fraction(batches, lengths[:, 1]), 4),
        "batches": len(batches),
        "mean_sentences_per_batch": round(float(np.mean([len(b) for b in batches])), 1),
        "max_padded_tokens_per_side": int(np.max(padded)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=DataConfig.max_tokens)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "bench_padding.json")
    args = ap.parse_args()

    cfg = DataConfig()
    try:
        read = read_dataset(cfg)["train"]
    except DataError as e:
        print(f"skipped: {e}")
        return
    src = [p.src for p in read.examples]
    tgt = [p.tgt for p in read.examples]
    data_key = file_hash(read.path)

    t0 = time.perf_counter()
    tok = load_or_train_tokenizer(lambda: src + tgt, cfg.tokenizer, data_key)
    t1 = time.perf_counter()
    store = tokenize_cached({"src": src, "tgt": tgt}, tok, data_key)
    t2 = time.perf_counter()
    lengths = store.lengths("src", "tgt") + 1  # (N, 2) with </s> / <s>
    budget = TokenBudgetSampler(lengths, args.max_tokens, seed=args.seed).epoch_batches(0)
    t3 = time.perf_counter()
    fixed = random_batches(len(lengths), args.batch_size, seed=args.seed)

    result = {
        "data": str(read.path),
        "machine": machine_line(),
        "pairs": len(lengths),
        "tokenizer": f"{cfg.tokenizer.kind} {tok.vocab_size}",
        "mean_tokens": [round(float(x), 2) for x in lengths.mean(axis=0)],
        "token_budget": {"max_tokens": args.max_tokens, **_stats(budget, lengths)},
        "random_fixed": {"batch_size": args.batch_size, **_stats(fixed, lengths)},
        "seconds": {
            "tokenizer_load_or_train": round(t1 - t0, 2),
            "tokenize_or_load_cache": round(t2 - t1, 2),
            "build_epoch_batches": round(t3 - t2, 3),
        },
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
