"""Batched beam search for the encoder-decoder, on the KV cache.

Each source is encoded once; the first decoder step runs on one row per
source (so the cross-attention K/V are computed once per source) and the
cache is then expanded to `beam` rows. Every later step keeps the 2 x beam
best extensions of each source: those ending in EOS among the top `beam`
are finished hypotheses, the best `beam` others stay alive (as in fairseq).

Scores are summed log-probabilities divided by the GNMT length penalty
(Wu et al. 2016, eq. 14): ``lp(n) = ((5 + n) / 6) ** alpha`` with n the
number of generated tokens including EOS and alpha = `length_penalty`;
alpha = 0 ranks by raw log-probability, alpha = 1 is close to per-token
averaging, larger alpha favours longer outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainformer.generation.greedy import length_limits
from trainformer.generation.steppers import EncDecStepper, eval_mode
from trainformer.nn import native

Hypothesis = tuple[list[int], float]
_BLOCK = 32  # vocabulary block of `top_candidates`


def length_penalty_factor(n: int, alpha: float) -> float:
    """GNMT length penalty ((5 + n) / 6) ** alpha for n generated tokens."""
    return ((5.0 + n) / 6.0) ** alpha


class _Source:
    """Finished hypotheses and stopping rule of one source sentence."""

    def __init__(self, beam: int, limit: int, alpha: float, early_stopping: bool):
        self.beam, self.limit, self.alpha, self.early = beam, limit, alpha, early_stopping
        self.finished: list[Hypothesis] = []
        self.done = False

    def add(self, tokens: list[int], logprob: float, n: int) -> None:
        """A finished hypothesis of n generated tokens (its EOS, if any, counted but not kept)."""
        self.finished.append((tokens, logprob / length_penalty_factor(n, self.alpha)))

    def update_done(self, best_alive: float, n: int) -> None:
        """Stop when `beam` hypotheses are finished and (unless early) none alive can still win."""
        if self.done or n >= self.limit:
            self.done = True
            return
        if len(self.finished) < self.beam:
            return
        if self.early:
            self.done = True
            return
        # Future log-probs only fall; the best the alive beam can reach is its
        # current score over the largest penalty still possible.
        lp = max(length_penalty_factor(n + 1, self.alpha), length_penalty_factor(self.limit, self.alpha))
        worst_kept = sorted(s for _, s in self.finished)[-self.beam]
        self.done = best_alive / lp <= worst_kept

    def best(self, nbest: int) -> list[Hypothesis]:
        return sorted(self.finished, key=lambda h: -h[1])[:nbest]


def beam_translate(
    model: nn.Module,
    src: torch.Tensor,
    src_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    beam: int = 4,
    length_penalty: float = 1.0,
    max_len: int | None = None,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    nbest: int = 1,
    early_stopping: bool = True,
    use_cache: bool = True,
    drop_finished: bool = True,
) -> list[list[Hypothesis]]:
    """Beam-search translations.

    Args:
        model: an `EncoderDecoder`; src (B, S), src_mask (B, S) bool or None.
        beam: beam width; nbest: hypotheses returned per source (<= beam).
        length_penalty: GNMT alpha (see module docstring).
        max_len: most target tokens (EOS included); None = ``max_len_a * src_len + max_len_b``.
            A hypothesis still alive at its limit is finished as it is.
        early_stopping: True stops a source once `beam` hypotheses have ended
            (fairseq); False goes on until no alive hypothesis can beat them.
        use_cache: False re-runs the whole prefix each step (slow; for tests).
        drop_finished: a finished source's beams leave the batch; False keeps stepping them
            until the whole batch is done (as HF ``generate()`` does). The results are the same.
    Returns:
        per source, up to `nbest` (tokens without BOS/EOS, normalised score), best first.
    """
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be in [1, beam={beam}], got {nbest}")
    limits = length_limits(src, src_mask, model.cfg.max_len, max_len, max_len_a, max_len_b)
    sources = [_Source(beam, limit, length_penalty, early_stopping) for limit in limits]
    with eval_mode(model):
        _search(model, src, src_mask, bos_id, eos_id, beam, sources, use_cache, drop_finished)
    return [s.best(nbest) for s in sources]


def _search(model, src, src_mask, bos_id, eos_id, beam, sources, use_cache, drop_finished) -> None:
    b, device = src.shape[0], src.device
    stepper = EncDecStepper(model, src, src_mask, use_cache)
    tokens = torch.full((b, 1), bos_id, dtype=torch.long, device=device)  # (B * k, t), k = 1 at first
    scores = torch.zeros(b, 1, device=device)  # (B, k) summed log-probs of the alive beams
    for n in range(1, max(s.limit for s in sources) + 1):  # n = tokens generated after this step
        logits = stepper.logits(tokens)  # (B * k, V)
        k, vocab = scores.shape[1], logits.shape[-1]
        cand_scores, cand_idx = next_candidates(logits.view(b, k, vocab), scores, min(2 * beam, k * vocab))
        origin, token = cand_idx // vocab, cand_idx % vocab  # beam of origin, new token
        rows = origin + torch.arange(b, device=device)[:, None] * k  # (B, 2 beam) rows of `tokens`
        _finish(sources, tokens, rows, token, cand_scores, eos_id, beam, n)
        # The best `beam` candidates that do not end in EOS stay alive (stable order).
        rank = torch.arange(token.shape[1], device=device)
        keep = ((token == eos_id).long() * token.shape[1] + rank).argsort(dim=1)[:, :beam]  # (B, beam)
        rows, token, scores = rows.gather(1, keep).view(-1), token.gather(1, keep), cand_scores.gather(1, keep)
        tokens = torch.cat([tokens.index_select(0, rows), token.view(-1, 1)], dim=1)  # (B beam, t + 1)
        if k == 1 < beam:
            stepper.expand(rows, beam)
        else:
            stepper.select(rows, same_source=True)
        _finish_at_limit(sources, tokens, scores, n)
        best_alive = scores[:, 0].tolist()
        for s, alive in zip(sources, best_alive):
            s.update_done(alive, n)
        if all(s.done for s in sources):
            return
        if drop_finished and any(s.done for s in sources):  # no more work on finished sources
            keep = torch.tensor([i for i, s in enumerate(sources) if not s.done], device=device)  # (B',)
            k = scores.shape[1]
            rows = (keep[:, None] * k + torch.arange(k, device=device)).view(-1)  # (B' k,)
            tokens, scores = tokens.index_select(0, rows), scores.index_select(0, keep)
            stepper.select(rows)
            sources = [sources[i] for i in keep.tolist()]
            b = len(sources)


def top_candidates(logp: torch.Tensor, scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best extensions ``scores[b, j] + logp[b, j, w]`` of each source, best first.

    Args:
        logp: (B, k, V) next-token log-probs of each alive beam; scores: (B, k) their sums so far.
    Returns:
        values (B, n) and flat indices ``j * V + w`` (B, n), as ``(scores + logp).view(B, -1).topk(n)``.

    The same result without building the (B, k V) sum or running `topk` over it (the
    slowest part of a CPU beam step after the matmuls): the vocabulary is cut into
    blocks of `_BLOCK` words, the n blocks with the best maximum hold the n best
    words (a block outside them has a maximum below n other words), and only those
    n x `_BLOCK` candidates are summed and ranked.
    """
    b, k, v = logp.shape
    block = math.gcd(v, _BLOCK)
    if block < 8 or n * block >= k * v:
        return (scores[:, :, None] + logp).view(b, k * v).topk(n, dim=1)
    return _best_in_blocks(logp, scores, logp.view(b, k, v // block, block).amax(dim=-1), block, n)


def next_candidates(logits: torch.Tensor, scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_candidates` of ``log_softmax(logits)``: logits (B, k, V), scores (B, k).

    On the CPU, where the C kernels are built (`trainformer.nn.native`), without the
    log-softmax over the whole (B k, V) matrix: one pass over each row gives its
    log-sum-exp and block maxima, and only the candidates are normalised
    (``logits - lse``, equal to the log-softmax up to float rounding).
    """
    b, k, v = logits.shape
    block = math.gcd(v, _BLOCK)
    if (block < 8 or n * block >= k * v or logits.device.type != "cpu" or logits.dtype != torch.float32
            or not native.pays(logits.numel())):
        return top_candidates(torch.log_softmax(logits, dim=-1), scores, n)
    lse, block_max = native.logsumexp_block_max(logits.view(b * k, v), block)  # (B k,), (B k, V / block)
    offsets = scores - lse.view(b, k)  # (B, k): each beam's score minus its row's log-normaliser
    return _best_in_blocks(logits, offsets, block_max.view(b, k, -1), block, n)


def _best_in_blocks(values: torch.Tensor, offsets: torch.Tensor, block_max: torch.Tensor, block: int,
                    n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best ``offsets[b, j] + values[b, j, w]`` (values (B, k, V), offsets (B, k)), looked
    for in the n blocks of `block` words with the best ``offsets + block_max`` (B, k, V / block)."""
    b, k, v = values.shape
    best = block_max + offsets[:, :, None]  # (B, k, V / block)
    blocks = best.view(b, -1).topk(n, dim=1).indices  # (B, n) block numbers over the k beams
    cols = (blocks[:, :, None] * block + torch.arange(block, device=values.device)).view(b, -1)  # (B, n block)
    cand = offsets.gather(1, cols // v) + values.reshape(b, k * v).gather(1, cols)  # (B, n block)
    top, j = cand.topk(n, dim=1)
    return top, cols.gather(1, j)


def _finish(sources, tokens, rows, token, cand_scores, eos_id, beam, n) -> None:
    """Candidates ending in EOS among each source's top `beam` become finished hypotheses."""
    ended = (token[:, :beam] == eos_id).nonzero()  # (E, 2): source, candidate
    if ended.shape[0] == 0:
        return
    src_i, j = ended[:, 0], ended[:, 1]
    # one gather for all of them (indexing hypothesis by hypothesis costs more than the step's search)
    texts, values = tokens[rows[src_i, j], 1:].tolist(), cand_scores[src_i, j].tolist()
    for i, text, value in zip(src_i.tolist(), texts, values):
        s = sources[i]
        if not s.done and n <= s.limit:
            s.add(text, value, n)


def _finish_at_limit(sources, tokens, scores, n) -> None:
    """Sources that reached their length limit finish their alive beams as they are."""
    beam = scores.shape[1]
    for i, s in enumerate(sources):
        if not s.done and n == s.limit:
            for j in range(beam):
                s.add(tokens[i * beam + j, 1:].tolist(), float(scores[i, j]), n)
