"""Translating with a trained encoder-decoder.

`Translator` batches sentences by length under a token budget, decodes with
the KV cache (greedy, beam or sampling), and returns results in input order;
`teacher_forced_loss` scores given translations. What every translation
engine does alike — sources read as the model was trained to read them
(`encode_sources`, `source_window`), blank lines answered blank without
decoding, results put back in input order (`translate_in_order`) — is
written here once; `interop.ct2.Ct2Translator` decodes with CTranslate2
inside the same frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from trainformer.config import Config
from trainformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, TextTokenizer
from trainformer.generation import beam_translate, greedy_translate
from trainformer.generation.steppers import eval_mode
from trainformer.inference.common import inference_autocast
from trainformer.textio import warn
from trainformer.training.loss import cross_entropy_sum

# ----------------------------------------------------------------------------
# What every translation engine shares
# ----------------------------------------------------------------------------


def source_window(cfg: Config) -> int:
    """Most source tokens (``</s>`` included) a translator reads: the model's position table,
    or 4x the training data's ``max_len`` when that is shorter."""
    return min(cfg.model.max_len, max(cfg.data.max_len, 8) * 4)


def encode_sources(tokenizer: TextTokenizer, sentences: Sequence[str], max_src: int) -> tuple[list[list[int]], int]:
    """Token ids of each sentence with ``</s>``, an over-long one cut to `max_src`; and how many were cut."""
    out, cut = [], 0
    for ids in tokenizer.encode_batch(list(sentences)):
        if len(ids) + 1 > max_src:
            ids = ids[: max_src - 1]
            cut += 1
        out.append([*ids, EOS_ID])
    return out, cut


def translate_in_order(
    sentences: Sequence[str],
    nbest: int,
    tokenizer: TextTokenizer,
    max_src: int,
    decode: Callable[[list[list[int]]], Sequence[Sequence[str]]],
) -> tuple[list[list[str]], int]:
    """`nbest` translations of each sentence, in input order, and how many sources were cut.

    Blank sentences give empty translations without reaching `decode`; the others are
    encoded by `encode_sources` and ``decode(encoded)`` returns each one's texts (up to
    `nbest`, best first) in the order given, padded here with "" to `nbest`. Cut sources
    are reported with a warning.
    """
    results: list[list[str]] = [[""] * nbest for _ in sentences]
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    encoded, cut = encode_sources(tokenizer, [sentences[i] for i in todo], max_src)
    for i, texts in zip(todo, decode(encoded)):
        results[i] = ([*texts] + [""] * nbest)[:nbest]
    if cut:
        warn(f"{cut} input line(s) longer than {max_src - 1} tokens were truncated")
    return results, cut


# ----------------------------------------------------------------------------
# Our engine
# ----------------------------------------------------------------------------


class Translator:
    """Batched translation with a trained `EncoderDecoder` and its tokenizer.

    Args:
        model: the encoder-decoder; tokenizer: its tokenizer.
        cfg: the model's resolved config (its window, ``eval`` decoding settings and precision).
        precision: autocast precision (None: the config's ``train.precision``).
    """

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, cfg: Config, precision: str | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = next(model.parameters()).device
        self.precision = precision or cfg.train.precision
        self.max_src = source_window(cfg)
        self.truncated = 0
        # False keeps stepping finished sentences until the batch is done, as HF generate() does:
        # same output, for benchmarks/speed/bench_drop_finished.py to time the difference
        self.drop_finished = True

    # ----------------------------------------------------------------- input
    def _encode(self, sentences: list[str]) -> list[list[int]]:
        """Token ids with </s>; over-long sources are cut to the model's window (counted)."""
        ids, cut = encode_sources(self.tokenizer, sentences, self.max_src)
        self.truncated += cut
        return ids

    def _batches(self, lengths: list[int], budget: int) -> Iterator[list[int]]:
        """Indices sorted by length, grouped so that batch * longest <= budget."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) + 1) * lengths[i] > budget:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (B, S) and their mask (B, S), on the model's device."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids.to(self.device), (ids != PAD_ID).to(self.device)

    # ---------------------------------------------------------------- decode
    def translate(
        self,
        sentences: list[str],
        beam: int = 4,
        nbest: int = 1,
        max_len: int | None = None,
        sampling: dict | None = None,
    ) -> list[list[str]]:
        """Translations of `sentences` in input order: `nbest` strings each.

        Empty (or blank) sentences give empty translations without running the model.
        `sampling` (temperature, top_k, top_p, seed) replaces beam search when given.
        """
        results, self.truncated = translate_in_order(
            sentences, nbest, self.tokenizer, self.max_src,
            lambda encoded: self._translate_ids(encoded, beam, nbest, max_len, sampling),
        )
        return results

    def _translate_ids(self, encoded: list[list[int]], beam: int, nbest: int, max_len: int | None,
                       sampling: dict | None) -> list[list[str]]:
        """The texts of each encoded source (up to `nbest`), in the order given."""
        out: list[list[str]] = [[] for _ in encoded]
        budget = max(self.cfg.eval.batch_tokens // max(beam, 1), 64)
        generator = None
        if sampling is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(sampling.get("seed", 0)))
        for batch in self._batches([len(e) for e in encoded], budget):
            src, src_mask = self._pad([encoded[b] for b in batch])  # (B, S), (B, S)
            rows = len(batch) * max(beam, 1)  # rows of one decoding step
            with eval_mode(self.model), inference_autocast(self.device, self.precision, rows=rows):
                hyps = self._decode(src, src_mask, beam, nbest, max_len, sampling, generator)
            for b, ids in zip(batch, hyps):
                out[b] = [self.tokenizer.decode(h) for h in ids]
        return out

    def _decode(self, src, src_mask, beam, nbest, limit, sampling, generator) -> list[list[list[int]]]:
        """Token ids of each source's hypotheses, best first."""
        common = dict(max_len=limit, max_len_a=self.cfg.eval.max_len_a, max_len_b=self.cfg.eval.max_len_b,
                      drop_finished=self.drop_finished)
        if sampling is not None:
            outs = greedy_translate(
                self.model, src, src_mask, BOS_ID, EOS_ID, **common, generator=generator,
                temperature=float(sampling.get("temperature", 1.0)),
                top_k=int(sampling.get("top_k", 0)), top_p=float(sampling.get("top_p", 1.0)),
            )
            return [[o] for o in outs]
        if beam <= 1:
            return [[o] for o in greedy_translate(self.model, src, src_mask, BOS_ID, EOS_ID, **common)]
        outs = beam_translate(
            self.model, src, src_mask, BOS_ID, EOS_ID, beam=beam, nbest=nbest,
            length_penalty=self.cfg.eval.length_penalty, **common,
        )
        return [[ids for ids, _score in hyps] for hyps in outs]

    def teacher_forced_loss(self, sources: list[str], targets: list[str]) -> float:
        """Mean per-token cross-entropy (no smoothing) of `targets` given `sources`."""
        src_ids, tgt_ids = self._encode(sources), self.tokenizer.encode_batch(targets)
        total, count = 0.0, 0.0
        lengths = [max(len(src_ids[i]), len(tgt_ids[i]) + 1) for i in range(len(sources))]
        with eval_mode(self.model), inference_autocast(self.device, self.precision):
            for batch in self._batches(lengths, self.cfg.eval.batch_tokens):
                src, src_mask = self._pad([src_ids[b] for b in batch])  # (B, S)
                tgt_in, _ = self._pad([[BOS_ID, *tgt_ids[b]] for b in batch])  # (B, T)
                labels, label_mask = self._pad([[*tgt_ids[b], EOS_ID] for b in batch])  # (B, T)
                labels = labels.masked_fill(~label_mask, -100)
                logits = self.model(src, tgt_in, src_mask)  # (B, T, V)
                loss_sum, n = cross_entropy_sum(logits, labels)
                total += float(loss_sum)
                count += float(n)
        return total / max(count, 1.0)
