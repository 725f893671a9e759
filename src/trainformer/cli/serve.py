"""`trainformer serve MODEL_DIR [MODEL_DIR ...]`: an HTTP API over trained models (see docs/serve.md)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from trainformer.cli.common import add_runtime_args
from trainformer.errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][\w.:/-]*$")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve models over HTTP: translate, extract, OpenAI-compatible chat",
        description="Serve trained models over HTTP: POST /v1/translate, /v1/extract, the OpenAI-compatible "
        "/v1/chat/completions and /v1/completions, GET /v1/models, /healthz, /readyz, /metrics, and a "
        "playground page at /. Concurrent requests for a model are merged into batches. SIGTERM or "
        "Ctrl-C: stop accepting, finish the requests in flight, exit 0.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL_DIR",
                   help="a model/ or run directory (translation, ner, relations, lm or chat); "
                   "NAME=DIR names it")
    p.add_argument("--name", action="append", default=[],
                   help="the name of each MODEL_DIR, in order (repeatable; default: the folder's name, "
                   "the run's for a run dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("TRAINFORMER_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                   "(default: $TRAINFORMER_API_KEY; keeps the key out of the process list)")
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch-tokens", type=int, default=8192,
                   help="work merged into one batch, in tokens (default 8192)")
    b.add_argument("--max-batch-requests", type=int, default=256, help="requests merged into one batch")
    b.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a lone request waits for companions (default 5 ms)")
    b.add_argument("--no-batching", action="store_true", help="one request at a time (for comparison)")
    b.add_argument("--max-queue", type=int, default=1024, help="requests waiting per model; more get 429")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size (default 1 MiB)")
    lim.add_argument("--max-texts", type=int, default=64, help="texts (or prompts) per request (default 64)")
    lim.add_argument("--max-text-tokens", type=int, default=512, help="tokens per text (and the model's window)")
    lim.add_argument("--max-reply-tokens", type=int, default=256, help="tokens one reply may ask for (default 256)")
    lim.add_argument("--max-n", type=int, default=8, help="choices per chat/completion request (default 8)")
    lim.add_argument("--timeout", type=float, default=60.0, help="seconds per request before a 504 (default 60)")
    lim.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM, how long requests in flight may take to finish (default 30 s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    add_runtime_args(p)
    p.set_defaults(func=run)


def default_name(path: str) -> str:
    """``runs/en-fr`` and ``runs/en-fr/model`` -> ``en-fr``; ``exports/bot`` -> ``bot``."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "model" else p.name


def model_specs(models: list[str], names: list[str]):
    """(name, directory) of each MODEL_DIR argument, checked, as `ModelSpec`s."""
    from trainformer.serve.engines import ModelSpec

    if len(names) > len(models):
        raise UserError(f"--name: {len(names)} names for {len(models)} model directories")
    specs, seen = [], set()
    for i, item in enumerate(models):
        name, path = None, item
        if "=" in item and not Path(item).exists():
            name, path = item.split("=", 1)
        name = name or (names[i] if i < len(names) else default_name(path))
        if not _NAME.match(name):
            raise UserError(f"{item}: model name {name!r}: use letters, digits and . _ - : /")
        if name in seen:
            raise UserError(f"{item}: the name {name!r} is taken by another model; name them with --name "
                            "or NAME=DIR")
        seen.add(name)
        specs.append(ModelSpec.from_dir(name, path))
    return specs


def run(args) -> int:
    try:
        from trainformer.serve.app import build_app
        from trainformer.serve.server import bind_socket, exposure_warning, make_server
        from trainformer.serve.settings import ServeSettings
    except ImportError as e:
        raise UserError(f"serve needs the serve extra ({e.name} is missing): "
                        "pip install 'trainformer[serve]'") from None
    from trainformer.textio import warn

    settings = ServeSettings(
        max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, max_text_tokens=args.max_text_tokens,
        max_reply_tokens=args.max_reply_tokens, max_n=args.max_n, timeout_s=args.timeout,
        max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue, api_key=args.api_key,
        max_batch_requests=1 if args.no_batching else args.max_batch_requests,
        max_wait_ms=0.0 if args.no_batching else args.max_wait_ms,
        device=args.device, precision=args.precision,
    ).check()
    specs = model_specs(args.models, args.name)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    warning = exposure_warning(args.host, settings.api_key)
    if warning:
        warn(warning)
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="trainformer serve: %(levelname)s: %(message)s")
    failures: list[str] = []
    holder: dict = {}

    def on_failure(name: str, error: str) -> None:
        failures.append(f"model {name!r} failed to load: {error}")
        holder["server"].should_exit = True

    app = build_app(specs, settings, on_model_failure=on_failure)
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    server = holder["server"] = make_server(
        app, args.shutdown_timeout, args.log_level, not args.no_access_log,
        on_signal=lambda: setattr(app.state.serve, "draining", True))
    host = f"[{args.host}]" if ":" in args.host else args.host
    listed = ", ".join(f"{s.name} ({s.task})" for s in specs)
    print(f"trainformer serve: listening on http://{host}:{port} (playground at /); models: {listed}; "
          f"batching {'on' if settings.batching else 'off'}", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if failures:
        raise UserError("; ".join(failures))
    return 0
