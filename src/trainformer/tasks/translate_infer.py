"""Translating and scoring with a trained encoder-decoder.

`Translator` batches sentences by length under a token budget, decodes with
the KV cache (greedy, beam or sampling), and returns results in input order.
`score_translations` is sacreBLEU + chrF on detokenised text against every
reference of each source.
"""

from __future__ import annotations

from collections.abc import Iterator

import sacrebleu
import torch
from torch import nn

from trainformer.config import Config
from trainformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, TextTokenizer
from trainformer.generation import beam_translate, greedy_translate
from trainformer.textio import warn
from trainformer.training.loss import cross_entropy_sum


def score_translations(hyps: list[str], refs: list[list[str]]) -> dict[str, float | str]:
    """Corpus BLEU and chrF with every reference of each hypothesis (variable counts allowed)."""
    n_refs = max((len(r) for r in refs), default=1)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_refs)]
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, streams), chrf.corpus_score(hyps, streams)
    return {
        "bleu": round(b.score, 2),
        "chrf": round(c.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_detail": str(b),
    }


def inference_autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device` ('auto': bf16 only where it is fast)."""
    from trainformer.training.precision import build_precision

    return build_precision(precision, device).autocast()


class Translator:
    """Batched translation with a trained `EncoderDecoder` and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, cfg: Config, precision: str | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = next(model.parameters()).device
        self.precision = precision or cfg.train.precision
        self.max_src = min(cfg.model.max_len, max(cfg.data.max_len, 8) * 4)
        self.truncated = 0
        # False keeps stepping finished sentences until the batch is done, as HF generate() does:
        # same output, for benchmarks/speed/bench_drop_finished.py to time the difference
        self.drop_finished = True

    # ----------------------------------------------------------------- input
    def _encode(self, sentences: list[str]) -> list[list[int]]:
        """Token ids with </s>; over-long sources are cut to the model's window (counted)."""
        out = []
        for ids in self.tokenizer.encode_batch(sentences):
            if len(ids) + 1 > self.max_src:
                ids = ids[: self.max_src - 1]
                self.truncated += 1
            out.append([*ids, EOS_ID])
        return out

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
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids.to(self.device), (ids != PAD_ID).to(self.device)

    # ---------------------------------------------------------------- decode
    @torch.inference_mode()
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
        was_training = self.model.training
        self.model.eval()
        results: list[list[str]] = [[""] * nbest for _ in sentences]
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        self.truncated = 0
        encoded = self._encode([sentences[i] for i in todo])
        budget = max(self.cfg.eval.batch_tokens // max(beam, 1), 64)
        generator = None
        if sampling is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(sampling.get("seed", 0)))
        with inference_autocast(self.device, self.precision):
            for batch in self._batches([len(e) for e in encoded], budget):
                src, src_mask = self._pad([encoded[b] for b in batch])
                outs = self._decode(src, src_mask, beam, nbest, max_len, sampling, generator)
                for b, hyps in zip(batch, outs):
                    texts = [self.tokenizer.decode(h) for h in hyps]
                    results[todo[b]] = (texts + [""] * nbest)[:nbest]
        if self.truncated:
            warn(f"{self.truncated} input line(s) longer than {self.max_src - 1} tokens were truncated")
        self.model.train(was_training)
        return results

    def _decode(self, src, src_mask, beam, nbest, limit, sampling, generator) -> list[list[list[int]]]:
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

    @torch.inference_mode()
    def teacher_forced_loss(self, sources: list[str], targets: list[str]) -> float:
        """Mean per-token cross-entropy (no smoothing) of `targets` given `sources`."""
        was_training = self.model.training
        self.model.eval()
        src_ids, tgt_ids = self._encode(sources), self.tokenizer.encode_batch(targets)
        total, count = 0.0, 0.0
        budget = self.cfg.eval.batch_tokens
        with inference_autocast(self.device, self.precision):
            for batch in self._batches([max(len(src_ids[i]), len(tgt_ids[i]) + 1) for i in range(len(sources))], budget):
                src, src_mask = self._pad([src_ids[b] for b in batch])
                tgt_in, _ = self._pad([[BOS_ID, *tgt_ids[b]] for b in batch])
                labels, label_mask = self._pad([[*tgt_ids[b], EOS_ID] for b in batch])
                labels = labels.masked_fill(~label_mask, -100)
                logits = self.model(src, tgt_in, src_mask)
                loss_sum, n = cross_entropy_sum(logits, labels)
                total += float(loss_sum)
                count += float(n)
        self.model.train(was_training)
        return total / max(count, 1.0)
