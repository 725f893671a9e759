"""Tagging words with a trained NER encoder (or an ensemble of them), and entities from raw text.

`Tagger.tag` gives the BIO tags of pre-split sentences: the encoder's (mean)
per-word log-probabilities, decoded by constrained Viterbi (`bio.viterbi_bio`)
with the model's tag-transition prior. `Tagger.extract` splits raw lines
into words with character offsets (`split_words`) and returns the entities
with offsets into the line (`entity_dicts`), as ``trainformer extract`` and
the server print them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainformer.data.batching import collate_tagging
from trainformer.data.chars import word_bytes
from trainformer.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, TextTokenizer
from trainformer.data.windows import join_sentences, window_groups
from trainformer.generation.steppers import eval_mode
from trainformer.inference.bio import OUTSIDE, TransitionPrior, bio_spans, viterbi_bio
from trainformer.inference.common import inference_autocast, inference_batches
from trainformer.textio import warn

# ----------------------------------------------------------------------------
# Words with character offsets
# ----------------------------------------------------------------------------

# CoNLL-2003-like word splitting on raw text: abbreviations (U.S.), a possessive
# 's split off its word (Germany 's), words with inner apostrophes or hyphens
# (O'Neill, Jean-Pierre), and every other non-space character on its own.
_WORD = re.compile(
    r"""
      (?:[^\W\d_]\.){2,}          # U.S. e.g.
    | \w+(?=['’][sS]\b)           # Germany  in  Germany's
    | ['’][sS]\b                  # 's
    | \w+(?:['’\-]\w+)*           # words, numbers, O'Neill, Jean-Pierre
    | [^\w\s]                     # punctuation, symbols, emoji: one character each
    """,
    re.VERBOSE,
)


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Words of `text` and their character offsets: [(word, start, end)], text[start:end] == word."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def entity_dicts(
    text: str, words: Sequence[tuple[str, int, int]], tags: Sequence[str]
) -> list[dict]:
    """``{"type", "text", "start", "end"}`` per entity, offsets into `text` (end exclusive)."""
    out = []
    for typ, first, last in bio_spans(tags):
        start, end = words[first][1], words[last - 1][2]
        out.append({"type": typ, "text": text[start:end], "start": start, "end": end})
    return out


# ----------------------------------------------------------------------------
# The tagger
# ----------------------------------------------------------------------------

# One sentence ready for the model: subword ids, their word indexes, the words' bytes (or
# None), the number of words.
Encoded = tuple[list[int], list[int], np.ndarray | None, int]


class Tagger:
    """Batched BIO tagging of pre-split sentences with a trained tagging encoder, or several.

    Args:
        model: an `Encoder` with a tagging head, or several trained on the same labels and
            tokenizer (an ensemble: their per-word log-probabilities are averaged, and with
            the mean of their priors Viterbi finds the path of highest mean score);
            tokenizer: its tokenizer.
        labels: label names in id order (BIO).
        max_len: the model's window; longer sentences are cut (their last words get ``O``).
        batch_tokens: padded tokens per inference batch.
        prior: the tag-bigram prior used in decoding (None: the BIO validity rules only).
        chars: give the models each word's bytes (`trainformer.data.chars`), for a character CNN.
        context_window: read consecutive sentences together in windows of up to this many
            positions (`trainformer.data.windows`; 0: each sentence alone), as the model was trained.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        tokenizer: TextTokenizer,
        labels: list[str],
        max_len: int,
        batch_tokens: int = 8000,
        precision: str = "auto",
        prior: TransitionPrior | None = None,
        chars: bool = False,
        context_window: int = 0,
    ):
        self.models = list(model) if isinstance(model, Sequence) else [model]
        self.model, self.tokenizer, self.labels = self.models[0], tokenizer, labels
        self.prior = prior
        self.limit = max_len - 2  # room for <cls> and <sep>
        self.batch_tokens = batch_tokens
        self.precision = precision
        self.chars = chars
        self.context_window = min(context_window, max_len)
        self.device = next(self.model.parameters()).device
        self.truncated = 0

    def _encode(self, sentences: list[list[str]]) -> list[Encoded]:
        """(ids, word index of each id, the words' bytes or None, word count) per sentence, cut
        to the window (counted)."""
        out = []
        for words, (ids, word_ids) in zip(sentences, self.tokenizer.encode_words_batch(sentences)):
            if len(ids) > self.limit:
                ids, word_ids = ids[: self.limit], word_ids[: self.limit]
                self.truncated += 1
            out.append((ids, word_ids, word_bytes(words) if self.chars else None, len(words)))
        return out

    def _windows(self, encoded: list[Encoded]) -> list[list[int]]:
        """Positions in `encoded` of each window of consecutive sentences read together
        (one sentence per window without a context window)."""
        if not self.context_window:
            return [[i] for i in range(len(encoded))]
        return window_groups([len(e[0]) for e in encoded], self.context_window)

    def _word_scores(self, windows: list[list[Encoded]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-word log-probabilities (K, N, L) of the K sentences of `windows`, in order, from
        their first subwords, and words per sentence (K,) up to the last word with a subword."""
        rows = [join_sentences([e[0] for e in win], [e[1] for e in win], [e[3] for e in win], SEP_ID)
                for win in windows]
        # collate puts each word's index within its sentence on its first subword, -100 elsewhere
        batch = collate_tagging(
            [ids for ids, _ in rows], [w for _, w in rows],
            [np.concatenate([np.arange(e[3]) for e in win]) for win in windows], PAD_ID, CLS_ID, SEP_ID,
            [np.concatenate([e[2] for e in win]) for win in windows] if self.chars else None,
            [[e[3] for e in win] for win in windows],
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids, mask, word_at, chars = batch["ids"], batch["mask"], batch["labels"], batch.get("chars")
        logp = sum(F.log_softmax(m(ids, mask, chars=chars).float(), dim=-1) for m in self.models) / len(self.models)  # (B, S, L)
        first = word_at >= 0  # (B, S)
        n_words = [max(e[1], default=-1) + 1 for win in windows for e in win]
        # a word with no subword at all (e.g. only a zero-width space) keeps score 0: no preference
        scores = logp.new_zeros(len(n_words), max(max(n_words), 1), logp.shape[-1])  # (K, N, L)
        scores[batch["sentence"][first], word_at[first]] = logp[first]
        return scores, torch.tensor(n_words)

    def tag(self, sentences: list[list[str]]) -> list[list[str]]:
        """BIO tags of each sentence (a list of words), one per word, in input order."""
        weight = self.prior.weight if self.prior is not None else 0.0
        return self.tag_each_weight(sentences, [weight])[weight]

    def tag_each_weight(self, sentences: list[list[str]], weights: Sequence[float]) -> dict[float, list[list[str]]]:
        """For each prior weight, the tags `tag` would give with it; the network runs once."""
        self.truncated = 0
        out = {w: [[OUTSIDE] * len(s) for s in sentences] for w in weights}
        todo = [i for i, s in enumerate(sentences) if s]
        encoded = self._encode([sentences[i] for i in todo])
        windows = self._windows(encoded)
        lengths = [sum(len(encoded[i][0]) + 1 for i in win) + 1 for win in windows]  # + <cls> and the <sep>s
        with eval_mode(*self.models), inference_autocast(self.device, self.precision):
            for batch in inference_batches(lengths, self.batch_tokens):
                scores, n_words = self._word_scores([[encoded[i] for i in windows[b]] for b in batch])
                order = [i for b in batch for i in windows[b]]  # the sentences of `scores`, in order
                for w in weights:
                    prior = self.prior.with_weight(w) if self.prior is not None else None
                    for i, path in zip(order, viterbi_bio(scores, n_words, self.labels, prior)):
                        out[w][todo[i]][: len(path)] = [self.labels[k] for k in path]
        return out

    def extract(self, lines: list[str]) -> list[dict[str, Any]]:
        """``{"text", "entities": [{"type", "text", "start", "end"}]}`` per raw text line.

        Words are split with `split_words`, so offsets index the original line.
        """
        words = [split_words(line) for line in lines]
        tags = self.tag([[w for w, _, _ in ws] for ws in words])
        if self.truncated:
            warn(f"{self.truncated} line(s) longer than {self.limit} tokens were truncated "
                 "(their last words are tagged O)")
        return [{"text": line, "entities": entity_dicts(line, ws, t)} for line, ws, t in zip(lines, words, tags)]
