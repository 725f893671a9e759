"""The tagging encoder's character CNN (``model.char_cnn``): one feature vector per word, from its bytes.

Only the tagging encoder builds it, and only when asked (it is off by
default), so it lives here rather than beside the token embedding that every
model uses (`trainformer.nn.embedding`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CharCNN(nn.Module):
    """Word features from the word's bytes (Ma & Hovy 2016, Lample et al. 2016), for tagging.

    byte embedding -> a width-3 convolution (a Linear over each window of three
    byte embeddings) -> ReLU -> max over the bytes -> Linear -> LayerNorm: one
    (D,) vector per word, which the encoder adds to each of the word's subword
    embeddings. Casing, digits, hyphens and name endings survive for words the
    subword vocabulary splits into pieces it rarely saw. Each distinct word of
    the batch is computed once (a word's subwords and its repeats share the
    row). Positions without bytes (wrappers, padding) get zeros.

    Parameters: ``embed`` (257, C), ``conv`` (F, 3C), ``proj`` (D, F), ``norm``.
    """

    WINDOW = 3

    def __init__(self, d_model: int, filters: int, byte_dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(257, byte_dim)  # UTF-8 byte + 1; 0 = padding (learned: the windows see word edges)
        self.conv = nn.Linear(self.WINDOW * byte_dim, filters)
        self.proj = nn.Linear(filters, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        """chars (B, S, W) byte ids (0 = padding) -> (B, S, D)."""
        b, s, w = chars.shape
        words, where = torch.unique(chars.reshape(b * s, w), dim=0, return_inverse=True)  # (U, W), (BS,)
        return self.words(words)[where].reshape(b, s, -1)

    def words(self, words: torch.Tensor) -> torch.Tensor:
        """words (U, W) byte ids -> (U, D); an all-padding row gives zeros."""
        e = F.pad(self.embed(words), (0, 0, 1, 1))  # (U, W + 2, C): a padding byte either side
        windows = torch.cat([e[:, k : k + words.shape[1]] for k in range(self.WINDOW)], dim=-1)  # (U, W, 3C)
        h = F.relu(self.conv(windows))  # (U, W, F)
        h = h.masked_fill((words == 0)[..., None], 0.0).amax(dim=1)  # (U, F); ReLU >= 0, so padding never wins
        has_word = (words != 0).any(dim=-1, keepdim=True)  # (U, 1)
        return self.norm(self.proj(h)) * has_word
