"""Translation: parallel text -> encoder-decoder -> sacreBLEU.

Data: pairs read with the bad-line policy, exact duplicates removed, split
by source sentence (so a sentence never appears in two splits, whatever its
translations), one joint BPE vocabulary for both languages (embeddings and
output head are shared), token-budget batches. Evaluation decodes with beam
search and scores detokenised output with sacreBLEU and chrF against every
reference of a source (multi-reference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from torch import nn

from trainformer.data.cache import file_hash, tokenize_cached
from trainformer.data.readers import BadLines, Pair, filter_too_long
from trainformer.data.registry import read_translation_pairs
from trainformer.data.splits import group_references, make_splits
from trainformer.data.tokenizer import load_or_train_tokenizer
from trainformer.inference.translator import Translator
from trainformer.models import build_model
from trainformer.training.task import Batch, StatefulBatches, Task, spread_indices

_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def split_key(source: str) -> str:
    """The grouping key of a source sentence: lowercased, punctuation and spaces removed.

    Stricter than the exact sentence, so "Hi." and "Hi!" land in the same
    split and near-identical pairs cannot leak from train into test.
    """
    return _PUNCT.sub(" ", source.lower()).strip()


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


@dataclass
class EvalSet:
    sources: list[str]
    references: list[list[str]]  # every reference of each source


class TranslationTask(Task):
    main_metric = "bleu"
    higher_is_better = True

    # ------------------------------------------------------------------ data
    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        d = self.cfg.data
        result, data_file = read_translation_pairs(d)
        pairs: list[Pair] = result.examples
        bad: BadLines = result.bad
        splits = make_splits(
            rows=[(p.src, p.tgt) for p in pairs],
            keys=[split_key(p.src) for p in pairs],
            valid_size=d.valid_size,
            test_size=d.test_size,
            seed=d.split_seed,
            group_rule="source sentence, lowercased, punctuation removed",
        )
        data_key = f"{file_hash(data_file)}:{d.split_seed}:{d.valid_size}:{d.test_size}"
        train_rows = splits.train[: d.limit] if d.limit else splits.train
        train = [pairs[i] for i in train_rows]
        self.tokenizer = load_or_train_tokenizer(
            lambda: (t for p in train for t in (p.src, p.tgt)), d.tokenizer, cache_key=data_key
        )
        store = tokenize_cached(
            {"src": [p.src for p in train], "tgt": [p.tgt for p in train]},
            self.tokenizer,
            data_key=f"{data_key}:train:{d.limit}",
        )
        # +1 for </s> on the source and for <s>/</s> on the target side
        lengths = np.stack([store["src"].lengths() + 1, store["tgt"].lengths() + 1], axis=1)
        keep = filter_too_long(result, lengths, d.max_len, rows=train_rows)
        self.store, self.train_index, self.lengths = store, keep, lengths[keep]
        self.eval_sets = {
            name: self._eval_set(pairs, splits[name]) for name in ("valid", "test")
        }
        self.rank, self.world_size = rank, world_size
        self.cfg.model.vocab_size = self.tokenizer.vocab_size
        self.report = {
            "data_file": str(data_file),
            "bad_lines": bad.report(),
            "splits": splits.report(),
            "train_pairs": int(len(keep)),
            "eval_sources": {k: len(v.sources) for k, v in self.eval_sets.items()},
        }
        self.write_data_report(run_dir, rank)

    def _eval_set(self, pairs: list[Pair], index: np.ndarray) -> EvalSet:
        grouped = group_references([p.src for p in pairs], [p.tgt for p in pairs], index)
        return EvalSet([s for s, _ in grouped], [r for _, r in grouped])

    def train_batches(self) -> StatefulBatches:
        from trainformer.data.batching import PairBatches

        assert self.tokenizer is not None, "setup() first"
        return PairBatches(
            self.store,
            self.train_index,
            self.lengths,
            max_tokens=self.cfg.data.max_tokens,
            seed=self.cfg.train.seed,
            rank=self.rank,
            world_size=self.world_size,
            max_len=self.cfg.data.max_len,
        )

    # ----------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model)

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["src"], batch["tgt_in"], batch["src_mask"]), batch["tgt_out"]  # (B, T, V), (B, T)

    def loss_tokens(self, batch: Batch) -> int:
        """Target tokens carrying loss, counted before the forward pass (exact accumulation)."""
        return int((batch["tgt_out"] != -100).sum())

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch["src_mask"].sum() + batch["tgt_mask"].sum())

    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per (source or target) token: 6 x the weights that token passes through.

        A source token passes the encoder, a target token the decoder and the output
        head; batches hold about as many of each, so the mean of the two is used.
        """
        enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))
        dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder_layers."))
        head = self.cfg.model.vocab_size * self.cfg.model.d_model
        return 6.0 * (enc + dec + head) / 2

    # ------------------------------------------------------------ evaluation
    def translator(self, model: nn.Module) -> Translator:
        assert self.tokenizer is not None
        return Translator(model, self.tokenizer, self.cfg)

    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        data = self.eval_sets[split]
        limit = self.cfg.eval.max_examples if split == "valid" else 0
        idx = spread_indices(len(data.sources), limit)
        sources, refs = [data.sources[i] for i in idx], [data.references[i] for i in idx]
        translator = self.translator(model)
        hyps = [n[0] for n in translator.translate(sources, beam=self.cfg.eval.beam)]
        scores = score_translations(hyps, refs)
        loss = translator.teacher_forced_loss(sources, [r[0] for r in refs])
        return {"bleu": scores["bleu"], "chrf": scores["chrf"], "loss": loss, "sentences": len(sources)}

    def samples(self, model: nn.Module) -> list[str]:
        data = self.eval_sets["test"]
        n = self.cfg.eval.samples
        idx = spread_indices(len(data.sources), n)
        sources = [data.sources[i] for i in idx]
        hyps = [h[0] for h in self.translator(model).translate(sources, beam=self.cfg.eval.beam)]
        return [
            f"EN:  {s}\nFR*: {h}\nREF: {data.references[i][0]}"
            for s, h, i in zip(sources, hyps, idx)
        ]


def held_out_split(model_dir: str | Path, split: str = "test") -> tuple[list[str], list[list[str]]]:
    """(sources, references per source) of a translation model's own held-out split ("valid" or
    "test"), rebuilt from its config and the data root as its training run made it (leak-free by
    construction), with the model's own tokenizer."""
    from trainformer.modeldir import read_model_config, resolve_model_dir

    cfg = read_model_config(model_dir)
    cfg.data.tokenizer.path = str(resolve_model_dir(model_dir) / "tokenizer.json")
    task = TranslationTask(cfg)
    task.setup(None)
    data = task.eval_sets[split]
    return data.sources, data.references
