"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    """Requests (by endpoint and status), errors (by endpoint and code), latency, and per model:
    queue depth and wait, batch sizes (requests, texts or rows, tokens), batch compute time,
    texts processed and tokens read and generated."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("trainformer_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("trainformer_request_errors", "requests answered with an error",
                              ["endpoint", "code"], registry=r)
        self.latency = Histogram("trainformer_request_duration_seconds",
                                 "time from request to the last byte of the response",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.in_flight = Gauge("trainformer_requests_in_flight", "requests being answered", registry=r)
        self.queue_depth = Gauge("trainformer_queue_depth", "requests waiting for a batch", ["model"], registry=r)
        self.queue_wait = Histogram("trainformer_queue_wait_seconds", "time a request waited for its batch",
                                    ["model"], buckets=_LATENCY, registry=r)
        self.batch_requests = Histogram("trainformer_batch_requests", "requests merged into one batch",
                                        ["model"], buckets=_SIZES, registry=r)
        self.batch_items = Histogram("trainformer_batch_items", "texts (or generated rows) in one batch",
                                     ["model"], buckets=_SIZES, registry=r)
        self.batch_tokens = Histogram("trainformer_batch_tokens", "tokens of work in one batch",
                                      ["model"], buckets=_TOKENS, registry=r)
        self.batch_seconds = Histogram("trainformer_batch_seconds", "compute time of one batch",
                                       ["model"], buckets=_LATENCY, registry=r)
        self.texts = Counter("trainformer_texts", "texts translated or extracted", ["model"], registry=r)
        self.prompt_tokens = Counter("trainformer_prompt_tokens", "tokens read (sources and prompts)",
                                     ["model"], registry=r)
        self.generated_tokens = Counter("trainformer_generated_tokens", "tokens generated",
                                        ["model"], registry=r)
        self.model_ready = Gauge("trainformer_model_ready", "1 once the model is loaded", ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
