"""A linear-chain CRF over words, for NER (Lafferty et al. 2001; Lample et al. 2016).

The tagging head scores each word on its own; a CRF adds a learned score for
the first tag (``start``, (L,)) and for every tag bigram (``trans``, (L, L),
row = previous tag) and trains the whole path: the loss of a sentence is
``log Z - score(gold path)``, where Z sums exp(score) over every *valid* BIO
path (the forward algorithm). Forbidden starts and transitions (``I-X`` not
after ``B-X``/``I-X``) get `FORBIDDEN` in training and -inf in decoding, so
training and `viterbi_bio` agree on which paths exist.

The learned scores decode through the same constrained Viterbi as the
counted prior (`learned_prior` -> `TransitionPrior` with weight 1).
Per-word constants do not change the best path, so decoding may use the
head's log-softmax where training used its raw logits.

The parameters live in the model (`TaggingHead` with ``model.crf: true``);
this module holds the maths on both sides: the loss the NER task trains
(`crf_nll` on `words_of`) and the learned scores a `Tagger` decodes with
(`learned_prior`). It sits beside `bio.py`, whose constraints and Viterbi it
shares, below the tasks that train with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainformer.inference.bio import TransitionPrior, allowed_transitions

# Score of a forbidden start / transition in training: finite, so no NaN reaches the gradient.
FORBIDDEN = -1e4


def words_of(
    logits: torch.Tensor, labels: torch.Tensor, sentence: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-subword logits -> per-word ones of each sentence, using the first-subword labels.

    Args:
        logits: (B, S, L) tag logits of every subword.
        labels: (B, S) a word's tag id on its first subword, -100 elsewhere.
        sentence: (B, S) the batch-wide sentence number of each subword when a row holds
            several sentences (`trainformer.data.windows`); None: one sentence per row.
    Returns:
        scores (K, N, L), tags (K, N) (0 past a sentence's end), lengths (K,): K sentences
        (B without `sentence`), N = most words.
    """
    first = labels >= 0  # (B, S)
    if sentence is None:
        owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(first)[first]  # (n,)
        k = labels.shape[0]
    else:
        owner = sentence[first]  # (n,) ascending: sentences are numbered row by row
        k = int(sentence.max()) + 1 if sentence.numel() else 0
    lengths = torch.bincount(owner, minlength=k)  # (K,)
    start = lengths.cumsum(0) - lengths  # (K,) where each sentence's words begin among the n
    word = torch.arange(owner.numel(), device=labels.device) - start[owner]  # (n,) index within its sentence
    n = max(int(lengths.max()), 1) if lengths.numel() else 1
    scores = logits.new_zeros(k, n, logits.shape[-1])  # (K, N, L)
    scores[owner, word] = logits[first]
    tags = labels.new_zeros(k, n)  # (K, N)
    tags[owner, word] = labels[first]
    return scores, tags, lengths


def _constrained(start: torch.Tensor, trans: torch.Tensor, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ok_start, ok_trans = allowed_transitions(labels)
    start = torch.where(ok_start.to(start.device), start, FORBIDDEN)
    trans = torch.where(ok_trans.to(trans.device), trans, FORBIDDEN)
    return start, trans


def crf_nll(
    scores: torch.Tensor,
    tags: torch.Tensor,
    lengths: torch.Tensor,
    start: torch.Tensor,
    trans: torch.Tensor,
    labels: Sequence[str],
) -> torch.Tensor:
    """Sum over sentences of -log P(gold tags | words) under the BIO-constrained CRF.

    Args:
        scores: (B, N, L) per-word tag scores (emissions); tags: (B, N) gold ids;
        lengths: (B,) words per sentence (0 = an empty row, which adds nothing).
        start: (L,) first-tag scores; trans: (L, L) bigram scores, row = previous tag.
        labels: the L BIO label names (for the validity constraints).
    Returns:
        a scalar: the summed negative log-likelihood (float32).
    """
    scores = scores.float()
    start, trans = _constrained(start.float(), trans.float(), labels)
    b, n, _ = scores.shape
    live = torch.arange(n, device=scores.device)[None, :] < lengths[:, None]  # (B, N)
    # score of the gold path
    emit = scores.gather(2, tags[:, :, None]).squeeze(2)  # (B, N)
    pair = trans[tags[:, :-1], tags[:, 1:]]  # (B, N-1)
    gold = start[tags[:, 0]] + (emit * live).sum(1) + (pair * live[:, 1:]).sum(1)  # (B,)
    # log Z: the forward algorithm over every valid path
    alpha = start + scores[:, 0]  # (B, L)
    for t in range(1, n):
        step = torch.logsumexp(alpha[:, :, None] + trans, dim=1) + scores[:, t]  # (B, L)
        alpha = torch.where(live[:, t, None], step, alpha)  # padding words carry alpha through
    log_z = torch.logsumexp(alpha, dim=1)  # (B,)
    return ((log_z - gold) * (lengths > 0)).sum()


def tagging_head(model: torch.nn.Module) -> torch.nn.Module:
    """The `TaggingHead` of a model, also under DDP (``.module``) or torch.compile."""
    return getattr(model, "module", model).head


def learned_prior(model: torch.nn.Module) -> TransitionPrior | None:
    """A tagging model's learned CRF scores as a weight-1 `TransitionPrior`; None without a CRF."""
    head = tagging_head(model)
    if head.crf_start is None:
        return None
    return TransitionPrior(head.crf_start.detach().float().cpu(), head.crf_trans.detach().float().cpu(), 1.0)
