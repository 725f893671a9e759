"""A toy translator for the interop tests: trained in-process in a few seconds, no data files.

The toy language (`test_translation_e2e.make_pairs`) translates word for word,
so a tiny encoder-decoder learns it quickly; fewer steps leave it unsure, so
beam search then differs from greedy on many sentences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from test_translation_e2e import make_pairs
from trainformer.config import TokenizerConfig, from_dict
from trainformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from trainformer.models import build_model


def right_pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), fill)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def train_toy_translator(steps: int = 300):
    """(model in eval mode, its Config, its tokenizer): a tiny encoder-decoder taught the toy language
    (~95% of sentences exact after 300 steps)."""
    pairs = make_pairs(600)
    tokenizer = train_tokenizer([text for pair in pairs for text in pair],
                                TokenizerConfig(vocab_size=100, min_frequency=1))
    cfg = from_dict({"task": "translation", "name": "toy-en-fr", "train": {"precision": "fp32"},
                     "model": {"preset": "tiny-encdec", "d_model": 64, "d_ff": 128, "n_heads": 4, "n_layers": 2,
                               "dropout": 0.0, "vocab_size": tokenizer.vocab_size}})
    src_ids = [[*tokenizer.encode(e), EOS_ID] for e, _ in pairs]
    tgt_ids = [tokenizer.encode(f) for _, f in pairs]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(pairs), (48,), generator=g).tolist()
        src = right_pad([src_ids[i] for i in idx], PAD_ID)
        tgt_in = right_pad([[BOS_ID, *tgt_ids[i]] for i in idx], PAD_ID)
        labels = right_pad([[*tgt_ids[i], EOS_ID] for i in idx], -100)
        loss = F.cross_entropy(model(src, tgt_in, src != PAD_ID).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cfg, tokenizer
