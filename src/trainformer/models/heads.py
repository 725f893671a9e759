"""Output heads of the encoder family: masked-LM, token tagging, relation classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainformer.config import ModelConfig
from trainformer.nn.norm import make_norm


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> GELU -> norm -> vocabulary logits (+ bias).

    The vocabulary projection is the token embedding (``tie_embeddings``) or
    its own ``decoder`` weight. Parameters: ``dense``, ``norm``, ``bias``, [``decoder``].
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.decoder = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """h (B, S, D), embedding (V, D) -> logits (B, S, V)."""
        h = self.norm(F.gelu(self.dense(h)))
        weight = embedding if self.decoder is None else self.decoder.weight
        return F.linear(h, weight, self.bias)


class TaggingHead(nn.Module):
    """Per-token classifier: dropout -> Linear(D, num_labels).

    Parameters: ``proj``; with ``cfg.crf`` also ``crf_start`` (L,) and ``crf_trans``
    (L, L, row = previous tag), the tag-path scores of a linear-chain CRF. The
    head only holds them: the CRF loss and decoding are in `trainformer.inference.crf`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.d_model, cfg.num_labels)
        self.crf_start = self.crf_trans = None
        if cfg.crf:
            self.crf_start = nn.Parameter(torch.zeros(cfg.num_labels))
            self.crf_trans = nn.Parameter(torch.zeros(cfg.num_labels, cfg.num_labels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, S, D) -> tag logits (B, S, L)."""
        return self.proj(self.drop(h))


class RelationHead(nn.Module):
    """Classifies the relation between two marked entities (Baldini Soares et al. 2019, "entity start").

    The hidden states at the two entity-start markers are concatenated (with
    ``relation_pool: start_between`` also the mean state of the tokens strictly
    between the markers) and fed to a one-hidden-layer MLP. Parameters:
    ``dense`` (2D or 3D -> D), ``proj`` (D -> L).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.between = cfg.relation_pool == "start_between"
        self.dense = nn.Linear((3 if self.between else 2) * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.d_model, cfg.num_labels)

    def forward(self, h: torch.Tensor, e1_pos: torch.Tensor, e2_pos: torch.Tensor) -> torch.Tensor:
        """h (B, S, D), e1_pos / e2_pos (B,) marker indices -> relation logits (B, L)."""
        rows = torch.arange(h.shape[0], device=h.device)
        parts = [h[rows, e1_pos], h[rows, e2_pos]]  # 2 x (B, D)
        if self.between:
            parts.append(span_mean(h, torch.minimum(e1_pos, e2_pos) + 1, torch.maximum(e1_pos, e2_pos)))
        pair = torch.cat(parts, dim=-1)  # (B, 2D) or (B, 3D)
        return self.proj(self.drop(F.gelu(self.dense(self.drop(pair)))))


def span_mean(h: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Mean of h[b, start[b]:end[b]] per row: h (B, S, D), start / end (B,) -> (B, D); 0 for empty spans."""
    pos = torch.arange(h.shape[1], device=h.device)  # (S,)
    inside = ((pos >= start[:, None]) & (pos < end[:, None])).to(h.dtype)  # (B, S)
    total = torch.einsum("bs,bsd->bd", inside, h)  # (B, D)
    return total / inside.sum(1, keepdim=True).clamp_min(1)
