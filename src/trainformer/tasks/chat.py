"""Chat: supervised fine-tuning of a pretrained `Decoder` on DailyDialog (talking to the result:
`trainformer.inference.chatbot`).

Data: DailyDialog's official splits (or one DailyDialog-format file, split by
dialogue). Validation and test dialogues that also occur in train
(lowercased, whitespace-normalised; 77 and 106 of them) are removed and the
counts stored in the run's data.json. Utterances are detokenised
(`lm.clean_dailydialog`).

Examples: alternating speakers become user / assistant, both ways round (the
first speaker as user, then the second), so every utterance after the first
is an assistant turn exactly once. A dialogue longer than the window
(``min(data.max_len, model.max_len)``) is cut into several examples, each
ending at an assistant turn and starting as far back as fits: the oldest
turns are dropped, never the newest. Loss falls on assistant turns only (see
`trainformer.data.chat_template`).

Tokenizer and model: with ``init_from`` (an `lm` run or model dir) the
pretrained tokenizer.json and architecture are reused. `lm-pretrain` already
reserves the role markers; a tokenizer without them gets them added and the
embedding (and untied head) grows, the pretrained rows copied. Without
``init_from`` a byte-level BPE is trained on the dialogues and the model
starts from scratch (with a warning).

Metrics: perplexity of assistant tokens (main, lower is better) on the
deduplicated valid split (test at the end), plus distinct-1/2 (Li et al.
2016) of replies sampled with a fixed seed to the fixed `CHAT_PROMPTS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.config import Config, DataConfig
from trainformer.data.batching import length_sorted_batches
from trainformer.data.cache import Ragged, file_hash
from trainformer.data.chat_template import (
    ChatTemplate,
    Message,
    Rendered,
    fit_window,
    has_chat_tokens,
    reserve_chat_tokens,
)
from trainformer.data.registry import DATASETS, read_file, resolve_dataset
from trainformer.data.splits import dedup, drop_overlap, make_splits
from trainformer.data.tokenizer import TextTokenizer, load_or_train_tokenizer
from trainformer.errors import ConfigError
from trainformer.inference.sampling import SamplingSettings, sample_ids
from trainformer.models import build_model
from trainformer.tasks.lm import (
    CausalBatches,
    causal_logits,
    causal_loss,
    clean_dailydialog,
    collate_causal,
    perplexity,
)
from trainformer.textio import warn
from trainformer.training.task import Batch, StatefulBatches, Task

# Fixed prompts for distinct-n, the end-of-run samples and the benchmark.
CHAT_PROMPTS = (
    "Hi, how are you doing today?",
    "What do you usually do on weekends?",
    "Can you recommend a good restaurant near here?",
    "I'm looking for a new apartment. Can you help me?",
    "What time does the bank open tomorrow?",
    "I have a job interview next week and I'm nervous.",
    "Do you like watching movies?",
    "How much does this jacket cost?",
    "Excuse me, where is the nearest subway station?",
    "What did you think of the concert last night?",
)
EVAL_SAMPLING = SamplingSettings(temperature=0.8, top_p=0.9, repetition_penalty=1.1, max_new_tokens=40)

# ----------------------------------------------------------------------------
# Dialogues
# ----------------------------------------------------------------------------


def dialogue_key(utterances: Sequence[str]) -> str:
    """Dedup key of a raw DailyDialog line: lowercased, whitespace-normalised."""
    return " ".join(" __eou__ ".join(utterances).lower().split())


def read_dialogue_splits(cfg: DataConfig) -> tuple[dict[str, list[list[str]]], list[Path], dict[str, Any]]:
    """Train/valid/test dialogues (raw utterances), deduplicated against train.

    Official splits are used when the data set has them; a single file is
    split by dialogue with `make_splits`. Returns (split -> dialogues, files, report).
    """
    if cfg.format not in (None, "dailydialog"):
        raise ConfigError(f"data.format: the chat task reads dailydialog files, got {cfg.format!r}")
    named = DATASETS.get(cfg.dataset)
    if named is not None and named.format != "dailydialog":
        raise ConfigError(f"data.dataset: {cfg.dataset!r} is {named.format} data; chat needs dialogues")
    _, files = resolve_dataset(dataclasses.replace(cfg, format="dailydialog"))
    results = {s: read_file("dailydialog", p, cfg) for s, p in files.items()}
    dialogues = {s: [d.utterances for d in r.examples] for s, r in results.items()}
    report: dict[str, Any] = {"files": {s: str(p) for s, p in files.items()},
                              "bad_lines": {s: r.bad.report() for s, r in results.items()}}
    if "valid" not in dialogues or "test" not in dialogues:
        dialogues, report["splits"] = _split_one_file(dialogues["train"], cfg)
    train_keys = [dialogue_key(d) for d in dialogues["train"]]
    kept = dedup(train_keys)
    report["train_duplicates_removed"] = len(train_keys) - len(kept)
    dialogues["train"] = [dialogues["train"][i] for i in kept]
    removed = {}
    for split in ("valid", "test"):
        keep = drop_overlap([dialogue_key(d) for d in dialogues[split]], train_keys)
        removed[split] = len(dialogues[split]) - len(keep)
        dialogues[split] = [dialogues[split][i] for i in keep]
    report["overlap_with_train_removed"] = removed
    report["dialogues"] = {s: len(v) for s, v in dialogues.items()}
    return dialogues, list(files.values()), report


def _split_one_file(train: list[list[str]], cfg: DataConfig) -> tuple[dict[str, list[list[str]]], dict]:
    keys = [dialogue_key(d) for d in train]
    splits = make_splits(keys, keys, cfg.valid_size, cfg.test_size, cfg.split_seed, "dialogue, lowercased")
    return {s: [train[i] for i in splits[s]] for s in ("train", "valid", "test")}, splits.report()


def clean_dialogue(utterances: Sequence[str]) -> list[str]:
    return [clean_dailydialog(u) for u in utterances]


# ----------------------------------------------------------------------------
# Training examples
# ----------------------------------------------------------------------------


def dialogue_examples(
    utterance_ids: Sequence[Sequence[int]], template: ChatTemplate, budget: int
) -> tuple[list[Rendered], int]:
    """Training examples of one dialogue (pre-tokenised utterances), both role assignments.

    Assignment 1: utterances 0, 2, 4... are the user, 1, 3, 5... the assistant;
    assignment 2 drops utterance 0 and swaps the roles. Each example ends at
    an assistant turn and reaches back as far as `budget` tokens allow, so
    every assistant turn carries loss exactly once, with the most recent
    context. Returns (examples, assistant turns skipped because even their
    user/assistant pair exceeds the budget).
    """
    examples: list[Rendered] = []
    skipped = 0
    for first in (0, 1):
        turns = list(utterance_ids[first:])
        lengths = [template.turn_length(t) for t in turns]
        end = len(turns) - 1 if len(turns) % 2 == 0 else len(turns) - 2  # last assistant turn
        while end >= 1:
            start = fit_window(lengths, end, budget)
            if start is None:
                skipped += 1
                end -= 2
                continue
            ex = Rendered()
            for k in range(start, end + 1):
                part = template.turn("user" if (k - start) % 2 == 0 else "assistant", turns[k])
                ex.extend(part.ids, part.loss_mask)
            examples.append(ex)
            end = start - 1
    return examples, skipped


def build_examples(
    dialogues: Sequence[Sequence[str]], template: ChatTemplate, budget: int
) -> tuple[Ragged, Ragged, int]:
    """Examples of many dialogues as (ids, loss mask) ragged arrays, and the skipped count."""
    flat = [u for d in dialogues for u in d]
    encoded = template.tokenizer.encode_batch(flat)
    ids, loss, skipped, pos = [], [], 0, 0
    for d in dialogues:
        exs, n_skip = dialogue_examples(encoded[pos : pos + len(d)], template, budget)
        pos += len(d)
        skipped += n_skip
        ids += [e.ids for e in exs]
        loss += [[int(m) for m in e.loss_mask] for e in exs]
    return Ragged.from_lists(ids), Ragged.from_lists(loss), skipped


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over lowercased words of `texts` (Li et al. 2016)."""
    grams = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def assistant_perplexity(
    score: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]],
    ids: Ragged,
    loss: Ragged,
    batch_tokens: int,
    device: torch.device,
    limit: int = 0,
) -> dict[str, float]:
    """Perplexity of the assistant tokens of examples (the first `limit` only, if > 0).

    `score(batch)` returns (loss sum, tokens) for a `collate_causal` batch.
    """
    n = min(limit, len(ids)) if limit else len(ids)
    order = np.arange(n)
    batches = length_sorted_batches(ids.lengths()[:n], batch_tokens, order)
    gen = (collate_causal(ids.take(b), loss.take(b)) for b in batches)
    return perplexity(score, gen, device)


def sample_replies(
    model: nn.Module,
    template: ChatTemplate,
    prompts: Sequence[str],
    settings: SamplingSettings,
    precision: str = "auto",
) -> list[str]:
    """One sampled reply per single-turn prompt (batched; `settings.seed` fixes them)."""
    rendered = [template.render([Message("user", p)], add_generation_prompt=True).ids for p in prompts]
    outs = sample_ids(model, rendered, settings, template.end_id, precision=precision)
    return [template.tokenizer.decode(o).strip() for o in outs]


def reply_diversity(replies: Sequence[str]) -> dict[str, float]:
    return {"distinct_1": distinct_n(replies, 1), "distinct_2": distinct_n(replies, 2)}


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


class ChatTask(Task):
    main_metric = "ppl"
    higher_is_better = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.pretrained_vocab = 0  # vocab size of init_from's model when the markers were added

    # ------------------------------------------------------------------ data
    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        d = self.cfg.data
        raw, files, report = read_dialogue_splits(d)
        if d.limit:
            raw["train"] = raw["train"][: d.limit]
        dialogues = {s: [clean_dialogue(x) for x in v] for s, v in raw.items()}
        data_key = ":".join([*(file_hash(f) for f in files), str(d.limit)])
        self.tokenizer = self._tokenizer(dialogues["train"], data_key)
        self.template = ChatTemplate(self.tokenizer)
        self.cfg.model.vocab_size = self.tokenizer.vocab_size
        budget = self.window() + 1  # inputs are ids[:-1]
        self.examples, skipped = {}, {}
        for split, dials in dialogues.items():
            ids, loss, skipped[split] = build_examples(dials, self.template, budget)
            self.examples[split] = (ids, loss)
        if len(self.examples["train"][0]) == 0:
            raise ConfigError(f"data.dataset: no training examples in {d.dataset!r}")
        self.rank, self.world_size = rank, world_size
        self.report = {
            **report,
            "examples": {s: len(v[0]) for s, v in self.examples.items()},
            "assistant_tokens": {s: int(v[1].values.sum()) for s, v in self.examples.items()},
            "turns_skipped_too_long": skipped,
            "window": self.window(),
            "init_from": self.cfg.init_from,
            "vocab_size": self.tokenizer.vocab_size,
            "vocab_resized_from": self.pretrained_vocab or None,
        }
        self.write_data_report(run_dir, rank)

    def window(self) -> int:
        return min(self.cfg.data.max_len, self.cfg.model.max_len)

    def _tokenizer(self, train: list[list[str]], data_key: str) -> TextTokenizer:
        """The pretrained model's tokenizer (and shape) with ``init_from``, else a new byte-level BPE."""
        if self.cfg.init_from:
            return self._pretrained_tokenizer(Path(self.cfg.init_from))
        warn("chat: init_from is not set, so the model is trained from scratch; "
             "pass --set init_from=RUN_DIR/model of an lm-pretrain run to fine-tune")
        tok = load_or_train_tokenizer(
            lambda: (u for dial in train for u in dial), self.cfg.data.tokenizer, cache_key=f"chat:{data_key}"
        )
        reserve_chat_tokens(tok)
        return tok

    def _pretrained_tokenizer(self, path: Path) -> TextTokenizer:
        from trainformer.modeldir import pretrained, take_pretrained_shape

        hint = "chat fine-tunes a decoder trained by the lm (or chat) task"
        model_dir, pre = pretrained(path, "decoder", hint)
        if pre.task not in ("lm", "chat"):
            raise ConfigError(f"init_from: {model_dir} holds a {pre.task!r} model; {hint}")
        tok = TextTokenizer.load(model_dir / "tokenizer.json")
        if not has_chat_tokens(tok):
            reserve_chat_tokens(tok)
            self.pretrained_vocab = pre.model.vocab_size
        # the architecture is the pretrained one; only dropout comes from this recipe
        take_pretrained_shape(self.cfg.model, pre.model, own={"dropout"})
        self.cfg.model.preset = None
        return tok

    def has_split(self, split: str) -> bool:
        return split in self.examples and len(self.examples[split][0]) > 0

    def train_batches(self) -> StatefulBatches:
        ids, loss = self.examples["train"]
        return CausalBatches(ids, loss, self.cfg.data.max_tokens, self.cfg.train.seed, self.rank, self.world_size)

    # ----------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        if self.cfg.model.family != "decoder":
            raise ConfigError(f"model.family: the chat task needs 'decoder', got {self.cfg.model.family!r}")
        model = build_model(self.cfg.model)
        if self.pretrained_vocab:
            self._copy_pretrained_rows(model)
        return model

    def _copy_pretrained_rows(self, model: nn.Module) -> None:
        """The embedding grew by the role markers: start its old rows from the pretrained ones
        (the trainer's `load_pretrained` skips tensors whose shape changed)."""
        from trainformer.training.checkpoint import find_weights, load_weights

        assert self.cfg.init_from is not None
        source = load_weights(find_weights(Path(self.cfg.init_from)))
        own = model.state_dict()
        with torch.no_grad():
            for name in ("tok_embed.weight", "lm_head.weight"):
                if name in source and name in own:
                    own[name][: self.pretrained_vocab].copy_(source[name][: self.pretrained_vocab])

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_logits(model, batch)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        ids, loss = self.examples[split]
        limit = self.cfg.eval.max_examples if split == "valid" else 0
        device = next(model.parameters()).device
        metrics = assistant_perplexity(
            lambda b: causal_loss(model, b), ids, loss, self.cfg.eval.batch_tokens, device, limit
        )
        replies = self.replies(model)
        return {**metrics, **reply_diversity(replies)}

    def replies(self, model: nn.Module) -> list[str]:
        settings = dataclasses.replace(EVAL_SAMPLING, seed=self.cfg.train.seed)
        return sample_replies(model, self.template, CHAT_PROMPTS, settings, self.cfg.train.precision)

    def samples(self, model: nn.Module) -> list[str]:
        n = self.cfg.eval.samples
        return [f"USER: {p}\nBOT:  {r}" for p, r in zip(CHAT_PROMPTS[:n], self.replies(model))]
