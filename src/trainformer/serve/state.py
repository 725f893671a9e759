"""What the routes share: the served models, the server's state, and waiting for a model's answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from trainformer.serve.batching import Batcher, Engine, Job
from trainformer.serve.engines import ENGINE_OF_TASK, ModelSpec
from trainformer.serve.errors import APIError, bad_request
from trainformer.serve.metrics import Metrics
from trainformer.serve.settings import ServeSettings

ENDPOINTS = ("/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/translate", "/v1/extract",
             "/v1/chat/completions", "/v1/completions")
_WHAT = {"translation": "a translation model", "extraction": "a ner or relations model",
         "generation": "an lm or chat model"}


@dataclass
class Served:
    """A model in the server: what it is, what runs it, its queue."""

    spec: ModelSpec
    engine: Engine
    batcher: Batcher
    created: int = 0


@dataclass
class ServerState:
    settings: ServeSettings
    metrics: Metrics
    models: dict[str, Served] = field(default_factory=dict)
    draining: bool = False

    @property
    def ready(self) -> bool:
        return not self.draining and all(m.batcher.state == "ready" for m in self.models.values())


def endpoint_label(path: str) -> str:
    """The route a path belongs to (bounded label values for the metrics)."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


def error_response(state: ServerState, path: str, error: APIError) -> JSONResponse:
    state.metrics.errors.labels(endpoint_label(path), error.code).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# ----------------------------------------------------------------------------
# Looking up a model and waiting for its answer
# ----------------------------------------------------------------------------


def served_model(state: ServerState, name: str, engine_kind: str, endpoint: str) -> Served:
    """The model `name` if it is served, loaded, and of the kind `endpoint` needs."""
    m = state.models.get(name)
    if m is None:
        known = ", ".join(sorted(state.models)) or "none"
        raise APIError(404, f"model {name!r} is not served here (served: {known}; GET /v1/models lists them)",
                       "model_not_found", "model")
    if ENGINE_OF_TASK[m.spec.task] != engine_kind:
        raise bad_request(f"model {name!r} is a {m.spec.task} model; {endpoint} needs {_WHAT[engine_kind]}",
                          "model", "wrong_model_type")
    if m.batcher.state == "loading":
        raise APIError(503, f"model {name!r} is still loading; retry shortly", "model_loading",
                       headers={"Retry-After": "1"})
    if m.batcher.state == "failed":
        raise APIError(503, f"model {name!r} failed to load: {m.batcher.error}", "model_failed")
    return m


def timeout_error(state: ServerState) -> APIError:
    return APIError(504, f"no answer within {state.settings.timeout_s:g} s (--timeout)", "timeout")


async def within(state: ServerState, job: Job, awaitable, seconds: float) -> Any:
    """`awaitable`'s result; after `seconds` (or if the handler is cancelled) `job` is dropped
    and the client gets a 504."""
    try:
        return await asyncio.wait_for(awaitable, max(seconds, 0.0))
    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        job.cancel()
        raise timeout_error(state) from None
    except asyncio.CancelledError:
        job.cancel()
        raise


async def answer(state: ServerState, m: Served, job: Job) -> Any:
    """Queue `job` and wait for its result, at most ``timeout_s``. Not refused while draining: the
    gate (`app.Gate`) refuses POSTs that arrive after the signal, and a request it let in before
    is answered (the batcher refuses only once it stops, after uvicorn's wait for requests in flight)."""
    m.batcher.submit(job)
    return await within(state, job, job.future, state.settings.timeout_s)
