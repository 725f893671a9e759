"""Batched greedy decoding (or ancestral sampling) for the encoder-decoder."""

from __future__ import annotations

import torch
from torch import nn

from trainformer.generation.sampling import sample_next
from trainformer.generation.steppers import EncDecStepper, eval_mode


def length_limits(
    src: torch.Tensor,
    src_mask: torch.Tensor | None,
    model_max_len: int,
    max_len: int | None = None,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
) -> list[int]:
    """Most target tokens (EOS included) per source: ``a * src_len + b``, or `max_len` if given.

    Never more than the model's position table allows (``model_max_len - 1``, one slot is BOS).
    """
    if src_mask is None:
        lengths = [src.shape[1]] * src.shape[0]
    else:
        lengths = src_mask.sum(dim=1).tolist()
    cap = model_max_len - 1
    if max_len is not None:
        return [max(1, min(max_len, cap))] * len(lengths)
    return [max(1, min(int(max_len_a * n + max_len_b), cap)) for n in lengths]


def strip_eos(row: list[int], eos_id: int) -> list[int]:
    """Tokens before the first EOS."""
    return row[: row.index(eos_id)] if eos_id in row else row


def greedy_translate(
    model: nn.Module,
    src: torch.Tensor,
    src_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    max_len: int | None = None,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    use_cache: bool = True,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    drop_finished: bool = True,
) -> list[list[int]]:
    """Greedy translations of a batch (or sampled ones when temperature > 0).

    Args:
        model: an `EncoderDecoder`.
        src: (B, S) source ids; src_mask: (B, S) bool (True = real token) or None.
        max_len: most target tokens per sentence; None = ``max_len_a * src_len + max_len_b``.
        use_cache: False re-runs the whole prefix each step (slow; for tests).
        temperature, top_k, top_p, generator: sampling (see `sample_next`); 0 = argmax.
        drop_finished: a sentence that has ended leaves the batch, so later steps do no work
            for it; False keeps stepping it until the whole batch is done (as HF ``generate()``
            does), for comparison. The results are the same.
    Returns:
        per sentence, the generated ids without BOS and EOS.
    """
    limits = length_limits(src, src_mask, model.cfg.max_len, max_len, max_len_a, max_len_b)
    out: list[list[int]] = [[] for _ in limits]
    with eval_mode(model):
        stepper = EncDecStepper(model, src, src_mask, use_cache)
        limit_t = torch.tensor(limits, device=src.device)
        alive = torch.arange(src.shape[0], device=src.device)  # (A,) sentence of each row in the batch
        ended = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)  # (A,)
        tokens = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)  # (A, t)
        for step in range(max(limits)):
            nxt = sample_next(stepper.logits(tokens), temperature, top_k, top_p, generator)  # (A,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = ((nxt == eos_id) | (step + 1 >= limit_t[alive])) & ~ended  # (A,) ends now
            if not bool(done.any()):
                continue
            for row, sentence in zip(done.nonzero().squeeze(1).tolist(), alive[done].tolist()):
                out[sentence] = tokens[row, 1:].tolist()
            ended |= done
            if bool(ended.all()):
                break
            if drop_finished:
                keep = (~ended).nonzero().squeeze(1)  # (A',) rows still decoding
                alive, tokens, ended = alive[keep], tokens[keep], ended[keep]
                stepper.select(keep)
    return [strip_eos(row[:limit], eos_id) for row, limit in zip(out, limits)]
