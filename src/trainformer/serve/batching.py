"""Dynamic batching: one worker thread per model merges concurrent requests into batches.

The event loop never runs torch. A request handler turns its request into a
`Job` and `submit`s it; the model's worker thread takes the oldest job, then
keeps taking jobs that may share its batch (same `key`, e.g. the same beam
size, and `Engine.fits`) until the batch holds ``max_batch_requests`` jobs
or ``max_batch_tokens`` of work, or ``max_wait_ms`` have passed since the
oldest job arrived. Requests that arrive while a batch runs wait in the
queue and make up the next batch, so under load the wait is rarely needed;
it gathers the requests of clients that answer a batch's replies at almost
the same moment. It is skipped when nothing suggests company: unless a
request has arrived while another was still unanswered in the last second
(or others are queued), a request runs at once, so one client at a time
pays no wait. Results go back to the event loop with ``call_soon_threadsafe``.

A batch that fails is run again one job at a time (when the engine allows
it), so one bad request cannot fail the others that shared its batch. A job
whose client has gone (timeout, disconnect) is `cancel`led: it is skipped if
it has not started, and generation drops its rows at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from trainformer.errors import UserError
from trainformer.serve.errors import APIError
from trainformer.serve.metrics import Metrics
from trainformer.serve.settings import ServeSettings

log = logging.getLogger("trainformer.serve")


class Job:
    """One request's work for one model, and the way back to the request's handler.

    Args:
        loop: the event loop the handler awaits on.
        payload: what the engine needs (texts, token ids, generation rows...).
        cost: tokens of work, counted against ``max_batch_tokens``.
        key: jobs merge only with jobs of an equal key.
        items: texts or rows in the job (for the batch-size metrics).
        on_event: called on the event loop with each streamed event (generation).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, payload: Any, cost: int, key: Hashable = None,
                 items: int = 1, on_event: Callable[[Any], None] | None = None):
        self.loop, self.payload, self.cost, self.key, self.items = loop, payload, cost, key, items
        self.future: asyncio.Future = loop.create_future()
        self.on_event = on_event
        self.enqueued = time.monotonic()
        self.cancelled = False  # written by the event loop, read by the worker

    def cancel(self) -> None:
        self.cancelled = True

    # ----------------------------------------------------- from the worker
    def resolve(self, value: Any) -> None:
        self._call(self._set, (value, None))

    def fail(self, error: BaseException) -> None:
        self._call(self._set, (None, error))
        self.emit(("error", error))  # a streaming handler waits on its events, not the future

    def emit(self, event: Any) -> None:
        if self.on_event is not None:
            self._call(self.on_event, event)

    def _call(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop has closed: nobody waits for this job any more
            pass

    def _set(self, outcome: tuple[Any, BaseException | None]) -> None:
        if self.future.done():
            return
        value, error = outcome
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(value)


class Engine:
    """What a batcher runs: loads a model, says which jobs may share a batch, runs a batch.

    `run` must resolve or fail every job it is given. ``retry_alone``: after a
    failed batch, run its jobs again one at a time (False where jobs have
    already streamed output).
    """

    task = ""
    retry_alone = True

    def load(self) -> None:
        raise NotImplementedError

    def fits(self, batch: list[Job], job: Job) -> bool:
        return True

    def run(self, jobs: list[Job]) -> None:
        raise NotImplementedError


def as_api_error(e: BaseException) -> APIError:
    """What the client is told about an exception in a worker; a bug's traceback stays in the log."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UserError):
        return APIError(400, str(e), "invalid_value")
    log.error("internal error while running a batch", exc_info=e)
    return APIError(500, f"internal error ({type(e).__name__}); the server log has the details",
                    "internal_error")


class Batcher:
    """The queue and worker thread of one served model (see the module docstring).

    ``state`` is ``loading`` until the engine has loaded its model, then
    ``ready``, or ``failed`` (``error`` says why; `on_failure` is called).
    """

    def __init__(self, name: str, engine: Engine, settings: ServeSettings, metrics: Metrics,
                 on_failure: Callable[[str, str], None] | None = None):
        self.name, self.engine, self.settings, self.metrics = name, engine, settings, metrics
        self.on_failure = on_failure
        self.queue: deque[Job] = deque()
        self.cond = threading.Condition()
        self.state, self.error = "loading", ""
        self.stopping = False
        self.unanswered: set[Job] = set()  # submitted jobs (event-loop side only)
        self.company_until = 0.0  # until then, expect concurrent requests (worth waiting for)
        self.thread = threading.Thread(target=self._main, name=f"serve-{name}", daemon=True)

    # ------------------------------------------------------ event-loop side
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; 503 while stopping, 429 when ``max_queue`` jobs already wait."""
        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down", "shutting_down")
            if len(self.queue) >= self.settings.max_queue:  # jobs whose clients left do not count
                self.queue = deque(j for j in self.queue if not j.cancelled)
            if len(self.queue) >= self.settings.max_queue:
                raise APIError(429, f"model {self.name!r} has {len(self.queue)} requests waiting "
                               "(--max-queue); retry later", "queue_full", headers={"Retry-After": "1"})
            # Futures are completed on the event loop, where this runs: `done()` is current here.
            self.unanswered = {j for j in self.unanswered if not (j.future.done() or j.cancelled)}
            if self.unanswered:  # concurrent requests: worth waiting for, for a while
                self.company_until = time.monotonic() + 1.0
            self.unanswered.add(job)
            self.queue.append(job)
            self.metrics.queue_depth.labels(self.name).set(len(self.queue))
            self.cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then end the worker thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ---------------------------------------------------------- worker side
    def _main(self) -> None:
        try:
            self.engine.load()
        except Exception as e:  # any load failure ends this model, with its reason
            self.state, self.error = "failed", f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
            log.error("model %r failed to load: %s", self.name, self.error)
            self.metrics.model_ready.labels(self.name).set(0)
            self._fail_queued(APIError(503, f"model {self.name!r} failed to load: {self.error}", "model_failed"))
            if self.on_failure is not None:
                self.on_failure(self.name, self.error)
            return
        self.state = "ready"
        self.metrics.model_ready.labels(self.name).set(1)
        log.info("model %r (%s) is ready", self.name, self.engine.task)
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _fail_queued(self, error: APIError) -> None:
        with self.cond:
            jobs, self.queue = list(self.queue), deque()
        for job in jobs:
            job.fail(error)

    def _next_batch(self) -> list[Job] | None:
        s = self.settings
        with self.cond:
            first = None
            while first is None:
                while self.queue and self.queue[0].cancelled:
                    self.queue.popleft()
                if self.queue:
                    first = self.queue.popleft()
                elif self.stopping:
                    return None
                else:
                    self.cond.wait()
            batch, cost = [first], first.cost
            company = bool(self.queue) or time.monotonic() < self.company_until  # else: a lone client
            deadline = first.enqueued + (s.max_wait_ms / 1000 if company else 0.0)
            while len(batch) < s.max_batch_requests and cost < s.max_batch_tokens:
                cost = self._take_compatible(batch, cost)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stopping or len(batch) >= s.max_batch_requests:
                    break
                self.cond.wait(remaining)
            self.metrics.queue_depth.labels(self.name).set(len(self.queue))
        return batch

    def _take_compatible(self, batch: list[Job], cost: int) -> int:
        """Move queued jobs that may join `batch` into it, oldest first; returns the new cost."""
        s, kept = self.settings, deque()
        while self.queue:
            job = self.queue.popleft()
            if job.cancelled:
                continue
            if (len(batch) < s.max_batch_requests and job.key == batch[0].key
                    and cost + job.cost <= s.max_batch_tokens and self.engine.fits(batch, job)):
                batch.append(job)
                cost += job.cost
            else:
                kept.append(job)
        self.queue = kept
        return cost

    def _run(self, batch: list[Job]) -> None:
        jobs = [j for j in batch if not j.cancelled]
        if not jobs:
            return
        m, name, now = self.metrics, self.name, time.monotonic()
        for job in jobs:
            m.queue_wait.labels(name).observe(now - job.enqueued)
        m.batch_requests.labels(name).observe(len(jobs))
        m.batch_items.labels(name).observe(sum(j.items for j in jobs))
        m.batch_tokens.labels(name).observe(sum(j.cost for j in jobs))
        try:
            self.engine.run(jobs)
        except Exception as e:  # reported to the clients, traceback logged
            if len(jobs) > 1 and self.engine.retry_alone:
                log.warning("a batch of %d requests for %r failed (%s); running them one by one",
                            len(jobs), name, e)
                for job in jobs:
                    self._run_alone(job)
            else:
                for job in jobs:
                    job.fail(as_api_error(e))
        finally:
            m.batch_seconds.labels(name).observe(time.monotonic() - now)

    def _run_alone(self, job: Job) -> None:
        try:
            self.engine.run([job])
        except Exception as e:
            job.fail(as_api_error(e))
