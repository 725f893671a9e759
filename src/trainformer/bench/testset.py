"""Test sentences for the translation benchmark scripts (benchmarks/speed, benchmarks/compression):
a model's own held-out test split, or a TSV, and an even spread of them over lengths."""

from __future__ import annotations

from pathlib import Path

from trainformer.modeldir import read_model_config


def translation_test_set(model_dir: Path, data: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """(sources, references per source) from a TSV, or the model's own held-out test split.

    The split is rebuilt from the model's config as its training run made it
    (leak-free by construction), with the model's own tokenizer.
    """
    cfg = read_model_config(model_dir)
    if data is not None:
        from trainformer.data.readers import read_parallel_tsv
        from trainformer.data.splits import group_references

        pairs = read_parallel_tsv(data, cfg.data.src_lang, cfg.data.tgt_lang).examples
        grouped = group_references([p.src for p in pairs], [p.tgt for p in pairs], range(len(pairs)))
        return [s for s, _ in grouped], [r for _, r in grouped]
    from trainformer.tasks.translation import held_out_split

    return held_out_split(model_dir, "test")


def spread_by_length(items: list[str], n: int) -> list[str]:
    """n items evenly spaced over a list sorted by length (short to long sentences alike)."""
    ordered = sorted(items, key=len)
    if n >= len(ordered):
        return ordered
    return [ordered[round(i * (len(ordered) - 1) / max(n - 1, 1))] for i in range(n)]


def length_chunks(sentences: list[str], size: int) -> list[list[str]]:
    """Chunks of `size` sentences of similar length (sorted short to long), as a server's batcher makes."""
    ordered = sorted(sentences, key=len)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def chunk_translator(model_dir: str | Path, precision: str = "fp32"):
    """A CPU `Translator` of `model_dir` that decodes every chunk it is given as one batch
    (as the other engines of the decoding benchmarks take a chunk), not split by token budget."""
    from trainformer.inference.loading import load_translator

    translator = load_translator(model_dir, "cpu", precision)
    translator.cfg.eval.batch_tokens = 1 << 20
    return translator
