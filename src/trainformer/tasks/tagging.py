"""Named-entity recognition: token classification on an encoder, scored with seqeval.

Data: CoNLL-style files (CoNLL-2003, WNUT-17, or a path), tags normalised to
BIO (`extraction.to_bio`), official splits where the data set has them.
Fine-tuning starts from an MLM-pretrained encoder (`init_from`), whose
tokenizer and shape are taken over (`extraction.inherit_pretrained`).

Labelling: each word's label sits on its first subword; other subwords,
padding and the ``<cls>``/``<sep>`` wrappers carry -100 (no loss).
Decoding: constrained Viterbi over the first-subword log-probabilities
(`extraction.viterbi_bio`), so the output is always valid BIO, plus a
tag-bigram prior counted on the training tags (`TransitionPrior`, saved as
``model/transitions.json``) whose weight is chosen on valid at each
evaluation unless ``eval.transition_weight`` fixes it. With ``model.crf:
true`` the head learns those scores instead, trained with a linear-chain CRF
loss (`trainformer.tasks.crf`), and decoding uses them with weight 1.
Metric: entity-level precision / recall / F1 with seqeval (conlleval
rules), micro-averaged and per type.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from seqeval.metrics import classification_report
from torch import nn

from trainformer.config import Config
from trainformer.data.batching import IGNORE_INDEX, collate_tagging
from trainformer.data.cache import Ragged, TokenStore, texts_hash, tokenize_words_cached
from trainformer.data.chars import word_bytes
from trainformer.data.readers import TaggedSentence, read_conll
from trainformer.data.tokenizer import (
    CLS_ID,
    PAD_ID,
    SEP_ID,
    UNK_ID,
    TextTokenizer,
    load_or_train_tokenizer,
)
from trainformer.data.windows import join_sentences, per_subword, window_groups, window_store
from trainformer.errors import UserError
from trainformer.generation.steppers import eval_mode
from trainformer.tasks.crf import crf_nll, learned_prior, tagging_head, words_of
from trainformer.tasks.extraction import (
    OUTSIDE,
    FineTuneTask,
    TransitionPrior,
    bio_labels,
    entity_dicts,
    inference_batches,
    read_eval_file,
    split_words,
    tag_type,
    to_bio,
    viterbi_bio,
)
from trainformer.tasks.translate_infer import inference_autocast
from trainformer.textio import warn
from trainformer.training.task import Batch


def score_entities(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level P/R/F1 (seqeval, conlleval rules): micro and per type (``f1_PER``...), in %."""
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    out = {
        "f1": round(100 * float(micro["f1-score"]), 2),
        "precision": round(100 * float(micro["precision"]), 2),
        "recall": round(100 * float(micro["recall"]), 2),
    }
    for typ, row in sorted(report.items()):
        if typ.endswith(" avg"):
            continue
        out[f"f1_{typ}"] = round(100 * float(row["f1-score"]), 2)
    out["entities"] = int(micro["support"])
    return out


# Prior weights tried on valid when eval.transition_weight is not set (0 = validity rules only).
TRANSITION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
TRANSITIONS_FILE = "transitions.json"


# ----------------------------------------------------------------------------
# Inference
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


def load_tagger(model_dir: str | Path, device: str = "auto", precision: str = "auto") -> Tagger:
    """A `Tagger` for a trained ``ner`` model directory, or an ensemble of them (see
    `trainformer.tasks.ensemble`)."""
    from trainformer.tasks.ensemble import load_members

    members = load_members(model_dir, "ner", device)
    loaded, tokenizer = members[0]
    if not loaded.labels:
        raise UserError(f"{loaded.path}: labels.json is missing")
    priors = [learned_prior(m.model) or load_prior(m.path / TRANSITIONS_FILE, m.labels) for m, _ in members]
    cfg = loaded.cfg
    chars = any(m.cfg.model.char_cnn for m, _ in members)
    if len({m.cfg.data.context_window for m, _ in members}) > 1:
        raise UserError(f"{model_dir}: the members were trained with different data.context_window; "
                        "an ensemble reads its sentences one way for all")
    return Tagger([m.model for m, _ in members], tokenizer, loaded.labels, cfg.model.max_len, cfg.eval.batch_tokens,
                  precision, mean_prior(priors, model_dir), chars, cfg.data.context_window)


def mean_prior(priors: Sequence[TransitionPrior | None], source: str | Path) -> TransitionPrior | None:
    """The weight-1 prior whose scores are the mean of the members' weighted scores (one
    member: its own prior). Members must all have a prior or all lack one."""
    if len(priors) == 1 or all(p is None for p in priors):
        return priors[0]
    if any(p is None for p in priors):
        raise UserError(f"{source}: some members decode with a tag-transition prior and some without")
    start = sum(p.weight * p.start for p in priors) / len(priors)
    trans = sum(p.weight * p.trans for p in priors) / len(priors)
    return TransitionPrior(start, trans, 1.0)


def load_prior(path: Path, labels: list[str]) -> TransitionPrior | None:
    """The `TransitionPrior` saved in `path`; None if there is none (model dirs from before
    the prior decode with the BIO validity rules only)."""
    if not path.is_file():
        return None
    try:
        return TransitionPrior.from_json(json.loads(path.read_text(encoding="utf-8")), labels, path)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: expected the tag-transition file a ner run writes ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


def drop_words(batch: Batch, p: float, only: torch.Tensor | None = None, keep_chars: bool = False) -> Batch:
    """`batch` with each word's subwords replaced by <unk> with probability `p` (and, when the
    batch has ``chars``, unless `keep_chars`, the word's bytes by padding, so the character CNN
    cannot see it either).

    A word starts at a labelled position (labels != IGNORE_INDEX) and runs up to the
    next one; <cls>, <sep> and padding are never touched. `only` (B, S) bool, on a word's
    first subword, limits the draw to those words (e.g. the rare ones). Uses the global
    RNG, which checkpoints save, so a resumed run draws the same words.
    """
    ids, labels = batch["ids"], batch["labels"]  # (B, S), (B, S)
    starts = labels != IGNORE_INDEX  # (B, S) first subwords
    word = starts.long().cumsum(1)  # (B, S) 1-based word of each position (0: before the first)
    chosen = starts & (torch.rand(ids.shape, device=ids.device) < p)  # (B, S)
    if only is not None:
        chosen &= only
    dropped = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.bool, device=ids.device)
    dropped.scatter_(1, word.masked_fill(~chosen, 0), chosen)  # (B, S + 1): by word number
    dropped[:, 0] = False
    inside = (ids != PAD_ID) & (ids != CLS_ID) & (ids != SEP_ID)  # (B, S)
    hidden = dropped.gather(1, word) & inside  # (B, S)
    out = {**batch, "ids": ids.masked_fill(hidden, UNK_ID)}
    if "chars" in batch and not keep_chars:
        out["chars"] = batch["chars"].masked_fill(hidden[..., None], 0)  # (B, S, W)
    return out


class TaggingTask(FineTuneTask):
    main_metric = "f1"
    head = "tagging"

    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        splits, report = self.read_splits(
            key=lambda s: " ".join(s.tokens).lower(), row=lambda s: (*s.tokens, "\t", *s.tags),
            group_rule="sentence, lowercased", default_format="conll",
        )
        train = splits["train"]
        examples = [TaggedSentence(s.tokens, to_bio(s.tags), s.line) for s in train.examples]
        self.labels = bio_labels([tag_type(t) for s in examples for t in s.tags if t != OUTSIDE])
        texts = [" ".join(s.tokens) for s in examples]
        self.tokenizer = load_or_train_tokenizer(lambda: iter(texts), self.cfg.data.tokenizer,
                                                 cache_key=texts_hash(texts))
        store = tokenize_words_cached([s.tokens for s in examples], self.tokenizer)
        fields = dict(store.fields)
        if self.cfg.model.char_cnn:
            fields["chars"] = Ragged.from_lists([word_bytes(s.tokens).ravel() for s in examples])
        if self.cfg.data.rare_word_dropout:
            counts = Counter(w for s in examples for w in s.tokens)
            fields["rare"] = Ragged.from_lists([[int(counts[w] == 1) for w in s.tokens] for s in examples])
        label_id = {t: i for i, t in enumerate(self.labels)}
        tag_ids = [[label_id[t] for t in s.tags] for s in examples]
        tags = Ragged.from_lists(tag_ids)
        weight = self.cfg.eval.transition_weight
        self.prior = TransitionPrior.count(tag_ids, len(self.labels), 1.0 if weight is None else weight)
        self._weight_chosen = weight is not None  # False until a valid evaluation has chosen it
        self.eval_sets = {
            name: [TaggedSentence(s.tokens, to_bio(s.tags), s.line) for s in splits[name].examples]
            for name in ("valid", "test")
        }
        self.finish_setup(run_dir, rank, world_size, train, TokenStore({**fields, "tags": tags}), report)

    def pack_train(self) -> dict[str, Any]:
        """With ``data.context_window``, the training sentences (in file order) become windows of
        consecutive sentences (`trainformer.data.windows`), the rows the sampler batches."""
        if not self.cfg.data.context_window:
            return {}
        self.store = window_store(self.store, self.train_index, self.cfg.data.context_window, SEP_ID)
        self.train_index = np.arange(len(self.store))
        self.lengths = self.store.lengths("ids") + 2  # + <cls> and the last <sep>
        return {"train_windows": len(self.store)}

    def collate(self, rows: dict[str, list[np.ndarray]]) -> Batch:
        batch = collate_tagging(rows["ids"], rows["word_ids"], rows["tags"], PAD_ID, CLS_ID, SEP_ID,
                                rows.get("chars"), rows.get("sentence_words"))
        if "rare" in rows:
            rare = per_subword(rows["word_ids"], rows["rare"], batch["ids"].shape[1], start=1, fill=0)  # after <cls>
            batch["rare"] = torch.from_numpy(rare.astype(bool))  # (B, S) on every subword of a rare word
        return batch

    def build_model(self) -> nn.Module:
        """The tagging encoder; a CRF head starts from the counted prior's log-probabilities,
        so the learned transitions begin where the counted ones stand (a checkpoint or
        `init_from` loaded afterwards overrides them)."""
        model = super().build_model()
        if self.cfg.model.crf:
            with torch.no_grad():
                model.head.crf_start.copy_(self.prior.start)
                model.head.crf_trans.copy_(self.prior.trans)
        return model

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["ids"], batch["mask"], chars=batch.get("chars")), batch["labels"]  # (B, S, L), (B, S)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy per word, or with ``model.crf`` the CRF's negative log-likelihood
        per sentence, summed (and divided by the words, like the cross-entropy).

        In training, ``data.word_dropout`` hides whole words (`drop_words`) first, and
        ``data.rare_word_dropout`` the subwords of words seen once in training (not their bytes).
        """
        if model.training and self.cfg.data.word_dropout:
            batch = drop_words(batch, self.cfg.data.word_dropout)
        if model.training and self.cfg.data.rare_word_dropout:
            batch = drop_words(batch, self.cfg.data.rare_word_dropout, only=batch["rare"], keep_chars=True)
        if not self.cfg.model.crf:
            return super().loss(model, batch)
        scores, tags, lengths = words_of(*self.logits(model, batch), batch.get("sentence"))  # (K, N, L), (K, N), (K,)
        head = tagging_head(model)
        nll = crf_nll(scores, tags, lengths, head.crf_start, head.crf_trans, self.labels)
        return nll, lengths.sum().float()

    def tagger(self, model: nn.Module) -> Tagger:
        assert self.tokenizer is not None, "setup() first"
        c = self.cfg
        prior = learned_prior(model) if c.model.crf else self.prior
        return Tagger(model, self.tokenizer, self.labels, c.model.max_len, c.eval.batch_tokens, c.train.precision,
                      prior, c.model.char_cnn > 0, c.data.context_window)

    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        """seqeval scores of `split`. On valid, unless ``eval.transition_weight`` is set, every
        weight of TRANSITION_WEIGHTS is tried and the best one kept for test and the model dir
        (a test evaluation in a process that has not chosen one yet, e.g. a resumed run, chooses
        it on valid first). A CRF model decodes with its learned scores (weight 1); valid also
        reports them off."""
        data = self.eval_examples(split)
        if not data:
            return {"f1": 0.0, "sentences": 0}
        if split == "test" and not self._weight_chosen and not self.cfg.model.crf:
            self.evaluate(model, "valid")
        sentences, gold = [s.tokens for s in data], [s.tags for s in data]
        tagger = self.tagger(model)
        extra = {}
        if self.cfg.model.crf:
            weights = (0.0, 1.0) if split == "valid" else (1.0,)
            scored = {w: score_entities(gold, p) for w, p in tagger.tag_each_weight(sentences, weights).items()}
            extra = {"f1_without_prior": scored[0.0]["f1"]} if split == "valid" else {}
            return {**scored[1.0], **extra, "transition_weight": 1.0, "sentences": len(data)}
        if split == "valid" and self.cfg.eval.transition_weight is None:
            tags = tagger.tag_each_weight(sentences, TRANSITION_WEIGHTS)
            scored = {w: score_entities(gold, p) for w, p in tags.items()}
            best = max(scored, key=lambda w: (scored[w]["f1"], -w))  # a tie goes to the smaller weight
            self.prior = self.prior.with_weight(best)
            self._weight_chosen = True
            extra = {"f1_without_prior": scored[0.0]["f1"]}
            result = scored[best]
        else:
            result = score_entities(gold, tagger.tag(sentences))
        return {**result, **extra, "transition_weight": self.prior.weight, "sentences": len(data)}

    def evaluate_model_dir(self, model_dir: Path, split: str) -> dict[str, float]:
        """The scores on `split` of a saved model or ensemble (e.g. of several seeds' runs), decoded
        with the transitions saved there."""
        data = self.eval_examples(split)
        if not data:
            return {"f1": 0.0, "sentences": 0}
        tagger = load_tagger(model_dir, self.cfg.train.device, self.cfg.train.precision)
        return score_tagger(tagger, [s.tokens for s in data], [s.tags for s in data])

    def save_artifacts(self, model_dir: Path) -> None:
        super().save_artifacts(model_dir)
        if self.cfg.model.crf:
            return  # the learned transitions are in the model's weights
        text = json.dumps(self.prior.to_json(self.labels), indent=1) + "\n"
        (model_dir / TRANSITIONS_FILE).write_text(text, encoding="utf-8")

    def samples(self, model: nn.Module) -> list[str]:
        lines = [" ".join(s.tokens) for s in self.sample_examples()]
        return [f"TEXT: {r['text']}\nENTS: " + "; ".join(f"{e['type']}: {e['text']}" for e in r["entities"])
                for r in self.tagger(model).extract(lines)]


# ----------------------------------------------------------------------------
# `trainformer evaluate` for ner models
# ----------------------------------------------------------------------------


def evaluate_file(cfg: Config, args) -> dict:
    """seqeval P/R/F1 (micro and per type) of a ``ner`` model on a CoNLL-format file."""
    tagger = load_tagger(args.model_dir, args.device, getattr(args, "precision", "auto"))
    result = read_eval_file(args, read_conll, "CoNLL: one 'token ... tag' per line, blank lines between sentences")
    gold = [to_bio(s.tags) for s in result.examples]
    return {**score_tagger(tagger, [s.tokens for s in result.examples], gold), "bad_lines": result.bad.total,
            "truncated": tagger.truncated}


def score_tagger(tagger: Tagger, sentences: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """seqeval scores of `tagger`'s BIO tags for `sentences` against `gold` (BIO)."""
    return {**score_entities(gold, tagger.tag(sentences)), "sentences": len(gold)}
