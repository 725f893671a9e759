"""The incremental-decoding state (KV cache) of a decoder stack.

One `KVCache` per generation call holds, for every decoder layer, the
self-attention keys/values of the tokens seen so far (appended each step)
and, for an encoder-decoder, the cross-attention keys/values of the encoder
memory (computed on the first step, then reused). It also keeps the key
padding mask of the cached tokens, so a left-padded prompt keeps masking its
padding while generation continues.

Beam search shares the cross-attention K/V between the beams of a source
(`KVCache.share_cross`): they are stored once per source, and the
cross-attention folds each source's beams into one query block.
"""

from __future__ import annotations

import torch

from trainformer.nn.masks import key_padding_mask


class LayerKV:
    """Keys and values of one attention layer, (B, KV, S, Dh) each, or empty.

    ``group`` (cross-attention only): each row of k/v serves `group` consecutive
    query rows, so a batch of B * group queries attends to B rows of k/v.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.group = 1

    @property
    def empty(self) -> bool:
        return self.k is None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' k, v (B, KV, T, Dh); return all of them (B, KV, P + T, Dh)."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v

    def select(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows: row i becomes old row index[i]."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class KVCache:
    """Decoding state of a stack of `n_layers` decoder layers.

    Attributes:
        self_kv: per layer, the self-attention K/V of the `length` tokens so far.
        cross_kv: per layer, the cross-attention K/V of the encoder memory.
        key_mask: (B, length) real-token mask of the cached tokens, or None if none was padded.
        cross_mask: (B, S) real-token mask of the encoder memory, or None.
        length: number of cached tokens.
    """

    def __init__(self, n_layers: int):
        self.self_kv = [LayerKV() for _ in range(n_layers)]
        self.cross_kv = [LayerKV() for _ in range(n_layers)]
        self.key_mask: torch.Tensor | None = None
        self._cross_mask: torch.Tensor | None = None
        self._cross_attn_mask: tuple[torch.Tensor | None] | None = None  # memo of `cross_attention_mask`
        self.length = 0

    @property
    def cross_mask(self) -> torch.Tensor | None:
        return self._cross_mask

    @cross_mask.setter
    def cross_mask(self, mask: torch.Tensor | None) -> None:
        self._cross_mask, self._cross_attn_mask = mask, None

    def cross_attention_mask(self) -> torch.Tensor | None:
        """`key_padding_mask` of `cross_mask`, (B, 1, 1, S), or None when no source is padded;
        worked out once, not at every decoding step (and again after `cross_mask` changes).
        A traced graph (ONNX export, torch.compile) keeps the mask: no data-dependent branch."""
        if self._cross_attn_mask is None:
            mask = self._cross_mask
            padded = mask is not None and (torch.compiler.is_compiling() or not bool(mask.all()))
            self._cross_attn_mask = (key_padding_mask(mask) if padded else None,)
        return self._cross_attn_mask[0]

    @property
    def has_cross(self) -> bool:
        return not self.cross_kv[0].empty if self.cross_kv else False

    @property
    def cross_group(self) -> int:
        return self.cross_kv[0].group if self.cross_kv else 1

    def share_cross(self, group: int) -> None:
        """From now on each row of cross K/V (and of `cross_mask`) serves `group` consecutive
        batch rows: call it when every source's row is about to become `group` rows (beam
        search's first expansion), then `select` those rows with ``cross=False``."""
        for kv in self.cross_kv:
            kv.group = group

    def select(self, index: torch.Tensor, cross: bool = True) -> None:
        """Reorder the batch: row i becomes old row `index[i]` (beam search, batch expansion).

        Beam search reorders beams of the same source only; their cross K/V are
        identical, so it passes ``cross=False`` and skips that copy. With shared
        cross K/V (`share_cross`) `index` must move whole groups (keep, drop or
        reorder sources); the cross K/V follow the groups.
        """
        for kv in self.self_kv:
            kv.select(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
        if cross:
            group = self.cross_group
            source = index if group == 1 else index.view(-1, group)[:, 0].div(group, rounding_mode="floor")
            for kv in self.cross_kv:
                kv.select(source)
            if self.cross_mask is not None:
                self.cross_mask = self.cross_mask.index_select(0, source)
