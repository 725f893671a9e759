"""The served models: what each task checks in a request, and how it runs a batch.

- `TranslationEngine`: a `Translator`. A batch is one ``translate`` call over
  the texts of every request in it (same beam, nbest and max_len); the
  Translator sorts them by length and decodes with the KV cache, and returns
  them in input order, so each request gets its own slice back.
- `ExtractionEngine`: a NER `Tagger` or a `RelationClassifier`; results are
  exactly what ``trainformer extract`` prints. A NER model trained with
  ``data.context_window`` reads a request's texts together as one document,
  so its requests never share a batch (a neighbour would change the context).
- `GenerationEngine`: an ``lm`` or ``chat`` `Decoder`; every choice of every
  request in a batch is one row of `decode_rows`.

The checks (`*_job`) run on the event loop and raise `APIError` (400) with
the field at fault, before anything is queued; `run` runs in the model's
worker thread.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainformer.data.tokenizer import EOS_ID
from trainformer.errors import UserError
from trainformer.modeldir import read_model_config, resolve_model_dir
from trainformer.serve.batching import Engine, Job
from trainformer.serve.decoding import GenRow, ReplyText, RowSampling, batch_fits, decode_rows
from trainformer.serve.errors import APIError, bad_request
from trainformer.serve.metrics import Metrics
from trainformer.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    ExtractRequest,
    SamplingRequest,
    TranslateRequest,
)
from trainformer.serve.settings import ServeSettings

# task of a model dir -> the engine that serves it
ENGINE_OF_TASK = {"translation": "translation", "ner": "extraction", "relations": "extraction",
         "lm": "generation", "chat": "generation"}


@dataclass
class ModelSpec:
    """A model to serve: its name in requests, its model/ folder and the task it was trained for."""

    name: str
    path: Path
    task: str

    @classmethod
    def from_dir(cls, name: str, path: str | Path) -> ModelSpec:
        """Check `path` (a model dir or run dir) without loading weights; a `UserError` if it cannot be served."""
        resolved = resolve_model_dir(path)
        task = read_model_config(resolved).task
        if task not in ENGINE_OF_TASK:
            raise UserError(f"{path}: a {task!r} model; serve takes translation, ner, relations, lm "
                            "and chat models")
        return cls(name, resolved, task)


def build_engine(spec: ModelSpec, settings: ServeSettings, metrics: Metrics) -> Engine:
    kind = {"translation": TranslationEngine, "extraction": ExtractionEngine,
            "generation": GenerationEngine}[ENGINE_OF_TASK[spec.task]]
    return kind(spec, settings, metrics)


def check_texts(texts: list[str], limit: int, param: str = "texts") -> None:
    if len(texts) > limit:
        raise APIError(400, f"{param}: {len(texts)} texts; at most {limit} per request (--max-texts)",
                       "too_many_texts", param)
    for i, text in enumerate(texts):
        if not text.strip():
            raise bad_request(f"{param}[{i}] is empty", f"{param}[{i}]", "empty_text")


def check_lengths(lengths: list[int], limit: int, model: str, param: str = "texts") -> None:
    for i, n in enumerate(lengths):
        if n > limit:
            raise bad_request(f"{param}[{i}] has {n} tokens; model {model!r} takes at most {limit} per text",
                              f"{param}[{i}]", "text_too_long")


class _Base(Engine):
    def __init__(self, spec: ModelSpec, settings: ServeSettings, metrics: Metrics):
        self.spec, self.settings, self.metrics = spec, settings, metrics
        self.name, self.task = spec.name, spec.task
        self.window = 0

    def describe(self) -> dict[str, Any]:
        return {"task": self.task, "max_len": self.window}


# ----------------------------------------------------------------------------
# Translation
# ----------------------------------------------------------------------------


class TranslationEngine(_Base):
    def load(self) -> None:
        from trainformer.inference.loading import load_translator

        self.translator = load_translator(self.spec.path, self.settings.device, self.settings.precision)
        self.window = self.translator.max_src - 1  # + </s>
        self.default_beam = self.translator.cfg.eval.beam

    def job(self, req: TranslateRequest, loop: asyncio.AbstractEventLoop) -> Job:
        s = self.settings
        check_texts(req.texts, s.max_texts)
        beam = req.beam or self.default_beam
        if req.nbest > beam:
            raise bad_request(f"nbest: {req.nbest} is more than the beam ({beam})", "nbest")
        if req.max_len is not None and req.max_len > s.max_reply_tokens:
            raise bad_request(f"max_len: at most {s.max_reply_tokens} (--max-reply-tokens)", "max_len")
        lengths = [len(ids) for ids in self.translator.tokenizer.encode_batch(req.texts)]
        check_lengths(lengths, min(self.window, s.max_text_tokens), self.name)
        cost = sum(n + 1 for n in lengths) * beam
        return Job(loop, list(req.texts), cost, key=(beam, req.nbest, req.max_len), items=len(req.texts))

    def run(self, jobs: list[Job]) -> None:
        beam, nbest, max_len = jobs[0].key
        texts = [t for job in jobs for t in job.payload]
        out = self.translator.translate(texts, beam=beam, nbest=nbest, max_len=max_len)
        self.metrics.texts.labels(self.name).inc(len(texts))
        self.metrics.prompt_tokens.labels(self.name).inc(sum(j.cost for j in jobs) // beam)
        start = 0
        for job in jobs:
            job.resolve(out[start : start + len(job.payload)])
            start += len(job.payload)


# ----------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------


class ExtractionEngine(_Base):
    def load(self) -> None:
        s = self.settings
        if self.task == "ner":
            from trainformer.inference.loading import load_tagger

            self.extractor = load_tagger(self.spec.path, s.device, s.precision)
            self.merge = not self.extractor.context_window  # a context window reads texts together
        else:
            from trainformer.inference.loading import load_classifier

            self.extractor = load_classifier(self.spec.path, s.device, s.precision)
            self.merge = True
        self.window = self.extractor.limit

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": list(self.extractor.labels)}

    def job(self, req: ExtractRequest, loop: asyncio.AbstractEventLoop) -> Job:
        check_texts(req.texts, self.settings.max_texts)
        tokenizer = self.extractor.tokenizer
        if self.task == "relations":
            from trainformer.data.markers import entity_markers_ok

            for i, text in enumerate(req.texts):
                if not entity_markers_ok(text):
                    raise bad_request(f"texts[{i}]: expected one <e1>..</e1> and one <e2>..</e2> around two "
                                      "non-overlapping spans", f"texts[{i}]", "bad_markers")
            lengths = [len(ids) for ids in tokenizer.encode_batch(req.texts)]
        else:
            from trainformer.inference.tagger import split_words

            words = [[w for w, _, _ in split_words(t)] for t in req.texts]
            lengths = [len(ids) for ids, _ in tokenizer.encode_words_batch(words)]
        check_lengths(lengths, min(self.window, self.settings.max_text_tokens), self.name)
        key = None if self.merge else object()  # object(): equal to no other job's key
        return Job(loop, list(req.texts), sum(lengths), key=key, items=len(req.texts))

    def run(self, jobs: list[Job]) -> None:
        texts = [t for job in jobs for t in job.payload]
        if self.task == "ner":
            out = self.extractor.extract(texts)
        else:
            out = self.extractor.extract(texts, "<request>")
        self.metrics.texts.labels(self.name).inc(len(texts))
        self.metrics.prompt_tokens.labels(self.name).inc(sum(j.cost for j in jobs))
        start = 0
        for job in jobs:
            job.resolve(out[start : start + len(job.payload)])
            start += len(job.payload)


# ----------------------------------------------------------------------------
# Generation (chat and completions)
# ----------------------------------------------------------------------------


@dataclass
class GenJob:
    """The rows of one request and how many are still running."""

    rows: list[GenRow]
    prompt_tokens: int
    dropped_messages: int = 0  # oldest chat turns left out to fit the window
    running: int = 0
    echo: dict[int, str] = field(default_factory=dict)  # completions with echo: choice -> prompt


class GenerationEngine(_Base):
    retry_alone = False  # rows may have streamed already

    def load(self) -> None:
        from trainformer.data.chat_template import ChatTemplate
        from trainformer.inference.loading import load_for_task

        loaded, self.tokenizer = load_for_task(self.spec.path, ("lm", "chat"), self.settings.device)
        self.model, self.cfg = loaded.model, loaded.cfg
        self.template = ChatTemplate(self.tokenizer) if self.task == "chat" else None
        self.window = self.cfg.model.max_len

    # ----------------------------------------------------------- requests
    def _settings(self, req: SamplingRequest, default_max: int) -> tuple[RowSampling, int, int, list[str], int]:
        """(sampling, max_tokens, n, stop strings, base seed) of a request, checked."""
        s = self.settings
        problem = req.unsupported()
        if problem:
            raise bad_request(f"{problem[0]} {problem[1]}", problem[0], "unsupported")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max
        if max_tokens > s.max_reply_tokens:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise bad_request(f"{param}: {max_tokens} is more than this server allows ({s.max_reply_tokens}, "
                              "--max-reply-tokens)", param)
        n = req.n or 1
        if n > s.max_n:
            raise bad_request(f"n: at most {s.max_n} choices per request (--max-n)", "n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not x for x in stops):
            raise bad_request("stop: up to 4 non-empty strings", "stop")
        sampling = RowSampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        )
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(1 << 63)
        return sampling, max_tokens, n, stops, seed

    def _room(self, max_tokens: int) -> int:
        """Most prompt tokens: the window less the reply's reserve (as `Chatbot` keeps it)."""
        return self.window - min(max_tokens, self.window // 2)

    def chat_job(self, req: ChatRequest, loop: asyncio.AbstractEventLoop, on_event=None) -> Job:
        from trainformer.data.chat_template import Message

        if self.template is None:
            raise bad_request(f"model {self.name!r} is a language model without a chat template; "
                              "use /v1/completions", "model", "wrong_model_type")
        sampling, max_tokens, n, stops, seed = self._settings(req, self.settings.max_reply_tokens)
        if not req.messages[-1].text().strip():
            raise bad_request(f"messages[{len(req.messages) - 1}].content is empty",
                              f"messages[{len(req.messages) - 1}].content", "empty_text")
        messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
        room = self._room(max_tokens)
        kept, dropped = self.template.fit(messages, room)
        ids = self.template.render(kept, add_generation_prompt=True).ids
        if len(ids) > room:
            raise bad_request(f"messages: the last message (with the system message) takes {len(ids)} tokens; "
                              f"model {self.name!r} has room for {room} with max_tokens={max_tokens} "
                              f"(window {self.window})", "messages", "context_length_exceeded")
        state = GenJob([], len(ids), dropped)
        cap = min(max_tokens, self.window - len(ids))
        for k in range(n):
            state.rows.append(GenRow(ids, cap, sampling, seed + k, ReplyText(self.tokenizer, stops, strip=True),
                                     index=k))
        return self._job(state, loop, self.template.end_id, on_event)

    def completion_job(self, req: CompletionRequest, loop: asyncio.AbstractEventLoop, on_event=None) -> Job:
        from trainformer.inference.sampling import prompt_ids

        sampling, max_tokens, n, stops, seed = self._settings(req, 16)  # OpenAI's default max_tokens
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise bad_request("prompt: expected a string or a non-empty list of strings", "prompt")
        if len(prompts) > self.settings.max_texts:  # an empty prompt is fine: it samples from scratch
            raise APIError(400, f"prompt: {len(prompts)} prompts; at most {self.settings.max_texts} per request "
                           "(--max-texts)", "too_many_texts", "prompt")
        room = self._room(max_tokens)
        state = GenJob([], 0)
        for i, text in enumerate(prompts):
            length = 1 + len(self.tokenizer.encode(text))  # </s> first, as a document starts
            if length > min(room, self.settings.max_text_tokens):
                param = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
                raise bad_request(f"{param} has {length} tokens; model {self.name!r} has room for "
                                  f"{min(room, self.settings.max_text_tokens)} with max_tokens={max_tokens}",
                                  param, "context_length_exceeded")
            ids = prompt_ids(self.tokenizer, text, self.window, max_tokens)
            state.prompt_tokens += len(ids)
            cap = min(max_tokens, self.window - len(ids))
            for k in range(n):
                index = i * n + k
                state.rows.append(GenRow(ids, cap, sampling, seed + index, ReplyText(self.tokenizer, stops),
                                         index=index))
                if req.echo:
                    state.echo[index] = text
        return self._job(state, loop, EOS_ID, on_event)

    def _job(self, state: GenJob, loop, eos_id: int, on_event) -> Job:
        state.running = len(state.rows)
        cost = sum(len(r.prompt) + r.cap for r in state.rows)
        if not batch_fits(state.rows, self.window):  # prompts of one request that differ a lot in length
            raise bad_request("prompt: these prompts differ too much in length to share the window; "
                              "send them in separate requests", "prompt", "context_length_exceeded")
        job = Job(loop, state, cost, key=eos_id, items=len(state.rows), on_event=on_event)
        for row in state.rows:
            row.owner = job
        return job

    # ------------------------------------------------------------- worker
    def fits(self, batch: list[Job], job: Job) -> bool:
        rows = [r for j in batch for r in j.payload.rows] + job.payload.rows
        return batch_fits(rows, self.window)

    def run(self, jobs: list[Job]) -> None:
        rows = [r for job in jobs for r in job.payload.rows]
        self.metrics.prompt_tokens.labels(self.name).inc(sum(j.payload.prompt_tokens for j in jobs))
        decode_rows(self.model, rows, jobs[0].key, self.settings.precision, on_text=self._on_text,
                    on_finish=self._on_finish, cancelled=lambda row: row.owner.cancelled)

    def _on_text(self, row: GenRow, piece: str) -> None:
        row.owner.emit(("text", row.index, piece))

    def _on_finish(self, row: GenRow) -> None:
        job: Job = row.owner
        self.metrics.generated_tokens.labels(self.name).inc(len(row.text.ids))
        job.emit(("finish", row.index, row.finish_reason))
        job.payload.running -= 1
        if job.payload.running == 0:
            job.resolve(job.payload)
