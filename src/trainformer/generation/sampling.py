"""Text generation from a decoder-only model: greedy or sampled, on the KV cache.

Sampling draws one uniform number per row and step from the caller's
`torch.Generator` and inverts the CDF of the filtered distribution, so a
seed fixes the output and the cached and uncached paths (whose logits differ
only by rounding) pick the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from trainformer.generation.steppers import DecoderStepper, eval_mode


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, T), mask (B, T)) padded on the left so every row ends at its last token."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = True
    return ids, mask


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): seen tokens' logits are divided by `penalty` if > 0, else multiplied.

    logits (N, V) float; seen (N, V) bool.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set of mass >= top_p.

    logits (N, V); top_k = 0 and top_p = 1 disable the filters. The most likely token always survives.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop_sorted = before >= top_p  # keeps the first token always (before = 0)
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from logits (N, V): argmax if temperature == 0, else a filtered sample. -> (N,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)  # (N, 1)
    cdf = probs.cumsum(dim=-1)
    # Inverse CDF; right=True never lands on a zero-probability token.
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return idx.clamp(max=logits.shape[-1] - 1)


def generate(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    *,
    prompt_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    stream: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
    drop_finished: bool = True,
) -> list[list[int]]:
    """Continue prompts with a `Decoder`.

    Args:
        prompt_ids: token lists (left-padded here) or a (B, T) tensor, left-padded with `prompt_mask`.
        max_new_tokens: most tokens generated per row (fewer if model.max_len is reached).
        eos_id: a row stops after generating it (it is not returned).
        temperature: 0 = greedy; top_k (0 = off), top_p (1 = off): filters before sampling.
        repetition_penalty: CTRL penalty on tokens already in the prompt or output (1 = off).
        generator: `torch.Generator` on the model's device that fixes the samples.
        stream: called as ``stream(row, token)`` for each new token as soon as it is chosen.
        use_cache: False re-runs the whole sequence each step (slow; for tests).
        drop_finished: a row that has generated `eos_id` leaves the batch, with its KV cache
            rows, so later steps do no work for it; False keeps stepping it until every row is
            done (as HF ``generate()`` does). Greedy results are the same either way; sampled
            ones differ, because the remaining rows draw from the generator in another order.
    Returns:
        per row, the generated token ids (without EOS).
    """
    device = next(model.parameters()).device
    if not isinstance(prompt_ids, torch.Tensor):
        prompt_ids, prompt_mask = left_pad(prompt_ids)
    tokens = prompt_ids.to(device)
    prompt_mask = prompt_mask.to(device) if prompt_mask is not None else None
    steps = min(max_new_tokens, model.cfg.max_len - tokens.shape[1])
    with eval_mode(model):
        new = _sample_loop(
            model, tokens, prompt_mask, steps, eos_id, temperature, top_k, top_p,
            repetition_penalty, generator, stream, use_cache, drop_finished,
        )
    return new


def _sample_loop(model, tokens, prompt_mask, steps, eos_id, temperature, top_k, top_p,
                 repetition_penalty, generator, stream, use_cache, drop_finished) -> list[list[int]]:
    n, vocab = tokens.shape[0], model.cfg.vocab_size
    stepper = DecoderStepper(model, prompt_mask, use_cache)
    seen = torch.zeros(n, vocab, dtype=torch.bool, device=tokens.device)  # (A, V)
    real = prompt_mask if prompt_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
    seen.scatter_(1, tokens, real)  # padding does not count as seen
    alive = list(range(n))  # the prompt of each row in the batch
    done = torch.zeros(n, dtype=torch.bool, device=tokens.device)  # (A,)
    out: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max(steps, 0)):
        logits = apply_repetition_penalty(stepper.logits(tokens), seen, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (A,)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (A, t)
        seen.scatter_(1, nxt[:, None], True)
        for prompt, tok, finished in zip(alive, nxt.tolist(), done.tolist()):
            if finished or tok == eos_id:
                continue
            out[prompt].append(tok)
            if stream is not None:
                stream(prompt, tok)
        if eos_id is None:
            continue
        done |= nxt == eos_id
        if bool(done.all()):
            break
        if drop_finished and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)  # (A',) rows still generating
            alive = [alive[i] for i in keep.tolist()]
            tokens, seen, done = tokens[keep], seen[keep], done[keep]
            stepper.select(keep)
    return out
