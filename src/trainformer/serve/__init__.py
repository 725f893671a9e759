"""`trainformer serve`: trained models behind an HTTP API, with dynamic batching and a playground.

- `settings.py`: the limits and batching bounds (`ServeSettings`).
- `schemas.py`: request bodies read under a size limit, validated strictly.
- `batching.py`: one worker thread per model merging concurrent requests (`Batcher`, `Job`).
- `engines.py`: what each task checks and how it runs a batch (translate, extract, generate).
- `decoding.py`: batched generation with per-row seeds, settings and stop strings.
- `app.py`: the routes, the gate (API key, draining, metrics) and errors in OpenAI's shape;
  `openai_api.py`: the OpenAI-compatible chat and completion endpoints; `state.py`: what
  the routes share (the served models, waiting for an answer within the timeout).
- `server.py`: uvicorn with a graceful, exit-0 SIGTERM.
- `static/index.html`: the playground, one page with no external resources.

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client).
"""
