"""OpenAI-compatible ``POST /v1/chat/completions`` and ``POST /v1/completions``.

Bodies and answers follow OpenAI's API reference, so the official clients
(and the UIs and SDKs built on them) work unchanged: ``choices`` with
``finish_reason`` ``stop`` or ``length``, ``usage`` token counts, and with
``stream: true`` server-sent events of ``chat.completion.chunk`` (or
``text_completion``) objects ending in ``data: [DONE]``, a usage chunk first
when ``stream_options.include_usage`` is set. Extensions: ``top_k`` and
``repetition_penalty``. The defaults are OpenAI's (temperature 1, top_p 1;
max_tokens 16 for completions, the server's ``--max-reply-tokens`` for chat).
``seed`` makes sampling reproducible: the same request and seed give the same
reply whatever else the server is doing; choice k of a request is seeded
with seed + k. A chat conversation longer than the model's window loses its
oldest turns (as ``trainformer chat`` does; the count is in the header
``X-Trainformer-Dropped-Messages``); a last message that alone does not fit
is a 400 ``context_length_exceeded``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from trainformer import __version__
from trainformer.serve.batching import Job, as_api_error
from trainformer.serve.engines import GenJob
from trainformer.serve.errors import APIError
from trainformer.serve.schemas import ChatRequest, CompletionRequest, read_json
from trainformer.serve.state import ServerState, answer, served_model, within

FINGERPRINT = f"trainformer-{__version__}"


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_json(request, ChatRequest, state.settings.max_body_bytes)
        return await _respond(state, req, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_json(request, CompletionRequest, state.settings.max_body_bytes)
        return await _respond(state, req, chat=False)


class _Reply:
    """The ids, objects and counts one response shares between its chunks."""

    def __init__(self, req: ChatRequest | CompletionRequest, chat: bool):
        self.req, self.chat = req, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def head(self) -> dict[str, Any]:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.req.model}
        if self.chat:
            out["system_fingerprint"] = FINGERPRINT
        return out

    def usage(self, gen: GenJob) -> dict[str, int]:
        done = sum(len(r.text.ids) for r in gen.rows)
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": done,
                "total_tokens": gen.prompt_tokens + done}

    def full(self, gen: GenJob) -> dict[str, Any]:
        choices = []
        for row in sorted(gen.rows, key=lambda r: r.index):
            if self.chat:
                choices.append({"index": row.index, "finish_reason": row.finish_reason, "logprobs": None,
                                "message": {"role": "assistant", "content": row.text.text, "refusal": None}})
            else:
                choices.append({"index": row.index, "finish_reason": row.finish_reason, "logprobs": None,
                                "text": gen.echo.get(row.index, "") + row.text.text})
        return {**self.head(), "choices": choices, "usage": self.usage(gen)}

    def chunk(self, index: int, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = {**self.head(), "object": f"{self.object}.chunk" if self.chat else self.object, "choices": [choice]}
        if self.wants_usage:
            out["usage"] = None
        return out

    @property
    def wants_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _respond(state: ServerState, req: ChatRequest | CompletionRequest, chat: bool):
    m = served_model(state, req.model, "generation", "/v1/chat/completions" if chat else "/v1/completions")
    loop = asyncio.get_running_loop()
    make = m.engine.chat_job if chat else m.engine.completion_job
    reply = _Reply(req, chat)
    if not req.stream:
        job = make(req, loop)
        gen = await answer(state, m, job)
        headers = {"X-Trainformer-Dropped-Messages": str(gen.dropped_messages)} if gen.dropped_messages else None
        return JSONResponse(reply.full(gen), headers=headers)
    events: asyncio.Queue = asyncio.Queue()
    job = make(req, loop, on_event=events.put_nowait)
    m.batcher.submit(job)  # queued even while draining: see `answer`
    deadline = loop.time() + state.settings.timeout_s
    # Wait for the first event before answering, so a timeout or a failure before any
    # token is still a JSON error with its status, not a broken stream.
    first = await within(state, job, events.get(), deadline - loop.time())
    if first[0] == "error":
        raise as_api_error(first[1])
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if job.payload.dropped_messages:
        headers["X-Trainformer-Dropped-Messages"] = str(job.payload.dropped_messages)
    return StreamingResponse(_stream(state, reply, job, events, first, deadline), media_type="text/event-stream",
                             headers=headers)


async def _stream(state: ServerState, reply: _Reply, job: Job, events: asyncio.Queue, first: tuple,
                  deadline: float) -> AsyncIterator[bytes]:
    gen: GenJob = job.payload
    loop = asyncio.get_running_loop()
    started: set[int] = set()
    finished = 0
    event = first
    try:
        while True:
            kind, index = event[0], event[1] if len(event) > 1 else None
            if kind == "error":
                yield _sse(as_api_error(event[1]).body())
                break
            if index not in started:  # each choice opens with its role (chat) or its echo (completions)
                started.add(index)
                opening = "" if reply.chat else gen.echo.get(index, "")
                if reply.chat or opening:
                    yield _sse(reply.chunk(index, opening, first=True))
            if kind == "text":
                yield _sse(reply.chunk(index, event[2]))
            elif kind == "finish":
                yield _sse(reply.chunk(index, None, finish=event[2]))
                finished += 1
                if finished == len(gen.rows):
                    if reply.wants_usage:
                        yield _sse({**reply.head(), "object": f"{reply.object}.chunk" if reply.chat else reply.object,
                                    "choices": [], "usage": reply.usage(gen)})
                    break
            try:
                event = await within(state, job, events.get(), deadline - loop.time())
            except APIError as e:  # the timeout, once the stream has started: its last event
                yield _sse(e.body())
                break
        yield _sse("[DONE]")
    finally:
        job.cancel()  # a client that leaves early (or a finished job: no effect) frees the rows

