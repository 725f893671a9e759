"""The HTTP application: routes, the gate (API key, draining, metrics), errors in OpenAI's shape.

Routes:
    GET  /                      the playground (one static page)
    GET  /healthz               liveness: 200 while the process serves, with each model's state
    GET  /readyz                readiness: 200 once every model is loaded, 503 before and while stopping
    GET  /metrics               Prometheus text format
    GET  /v1/models[/{model}]   the served models (OpenAI's list shape, plus task and window)
    POST /v1/translate          {model, texts[], beam?, nbest?, max_len?}
    POST /v1/extract            {model, texts[]} -> what `trainformer extract` prints, per text
    POST /v1/chat/completions   OpenAI-compatible (`openai_api.py`)
    POST /v1/completions        OpenAI-compatible

Torch never runs on the event loop: each model has a `Batcher` whose worker
thread loads it and runs its batches.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from trainformer import __version__
from trainformer.serve import openai_api
from trainformer.serve.batching import Batcher
from trainformer.serve.engines import ModelSpec, build_engine
from trainformer.serve.errors import APIError, bad_request
from trainformer.serve.metrics import Metrics
from trainformer.serve.schemas import ExtractRequest, TranslateRequest, read_json
from trainformer.serve.settings import ServeSettings
from trainformer.serve.state import (
    Served,
    ServerState,
    answer,
    endpoint_label,
    error_response,
    served_model,
)

log = logging.getLogger("trainformer.serve")
_NEEDS_KEY = ("/v1/", "/metrics")  # the playground and the health checks stay open

# ----------------------------------------------------------------------------
# The gate: every HTTP request passes it (pure ASGI, so streaming is untouched)
# ----------------------------------------------------------------------------


class Gate:
    """Counts and times every request; refuses one without the API key (401), and new work
    while the server stops (503)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        key = state.settings.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, metrics = scope["path"], self.state.metrics
        label, start, status = endpoint_label(path), time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            refusal = self.refusal(scope, path)
            if refusal is not None:
                await error_response(self.state, path, refusal)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(label, str(status)).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - start)

    def refusal(self, scope, path: str) -> APIError | None:
        if self.expected is not None and path.startswith(_NEEDS_KEY):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "no API key given" if not given else "the API key is wrong"
                return APIError(401, f"{what}: send the header 'Authorization: Bearer <key>' with the key "
                                "the server was started with (--api-key)", "invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        if self.state.draining and scope["method"] == "POST":
            return APIError(503, "the server is shutting down", "shutting_down")
        return None


# ----------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------


def playground_html() -> str:
    return (resources.files("trainformer.serve") / "static" / "index.html").read_text(encoding="utf-8")


def build_app(specs: list[ModelSpec], settings: ServeSettings,
              on_model_failure: Callable[[str, str], None] | None = None) -> FastAPI:
    """The app serving `specs` (loaded in the background when it starts, one worker thread each)."""
    settings.check()
    state = ServerState(settings, Metrics())
    for spec in specs:
        engine = build_engine(spec, settings, state.metrics)
        batcher = Batcher(spec.name, engine, settings, state.metrics, on_model_failure)
        created = int((spec.path / "config.json").stat().st_mtime)
        state.models[spec.name] = Served(spec, engine, batcher, created)
        state.metrics.model_ready.labels(spec.name).set(0)
    page = playground_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for m in state.models.values():
            m.batcher.start()
        yield
        state.draining = True
        await asyncio.gather(*(asyncio.to_thread(m.batcher.stop) for m in state.models.values()))

    app = FastAPI(title="trainformer", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages load a CDN
    app.state.serve = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(state, request.url.path, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            error = APIError(404, f"no such endpoint: {request.method} {request.url.path}", "not_found")
        elif e.status_code == 405:
            error = APIError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")
        else:
            error = APIError(e.status_code, str(e.detail), "http_error")
        return error_response(state, request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(state, request.url.path, bad_request(f"invalid request: {e.errors()[0]['msg']}"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(state, request.url.path, APIError(
            500, f"internal error ({type(e).__name__}); the server log has the details", "internal_error"))

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "ready": state.ready, "draining": state.draining,
                "models": {n: m.batcher.state for n, m in state.models.items()}}

    @app.get("/readyz")
    async def readyz():
        body = {"ready": state.ready, "draining": state.draining,
                "models": {n: m.batcher.state for n, m in state.models.items()}}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    def model_card(m: Served) -> dict[str, Any]:
        card = {"id": m.spec.name, "object": "model", "created": m.created, "owned_by": "trainformer",
                "task": m.spec.task, "state": m.batcher.state}
        if m.batcher.state == "ready":
            card.update(m.engine.describe())
        return card

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in state.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in state.models:
            raise APIError(404, f"model {name!r} is not served here", "model_not_found", "model")
        return model_card(state.models[name])

    @app.post("/v1/translate")
    async def translate(request: Request):
        req = await read_json(request, TranslateRequest, settings.max_body_bytes)
        m = served_model(state, req.model, "translation", "/v1/translate")
        job = m.engine.job(req, asyncio.get_running_loop())
        out = await answer(state, m, job)
        body = {"object": "translation", "model": req.model, "translations": [hyps[0] for hyps in out]}
        if req.nbest > 1:
            body["nbest"] = out
        return body

    @app.post("/v1/extract")
    async def extract(request: Request):
        req = await read_json(request, ExtractRequest, settings.max_body_bytes)
        m = served_model(state, req.model, "extraction", "/v1/extract")
        job = m.engine.job(req, asyncio.get_running_loop())
        results = await answer(state, m, job)
        return {"object": "extraction", "model": req.model, "task": m.spec.task, "results": results}

    openai_api.add_routes(app, state)
    return app
