"""`trainformer serve` as a real process: SIGTERM while a request is in flight.

The server stops accepting connections, answers the request it is working
on, and exits with status 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_serve import heavy_translation, models  # noqa: F401  (the session's tiny models)

# trains models or starts servers: the end-to-end tier (`pytest -m "not slow"` skips it)
pytestmark = pytest.mark.slow


def start(*args: str) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRAINFORMER_API_KEY"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainformer", "serve", *args, "--port", "0", "--threads", "1",
                             "--no-access-log", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()  # the first line names the port
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
    if not match:
        proc.kill()
        pytest.fail(f"no address in the server's first line: {line!r} {proc.stderr.read()[-2000:]}")
    url = match.group(1)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.1)


def in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(r"^trainformer_requests_in_flight (\S+)$", text, re.M).group(1))


def test_sigterm_finishes_the_request_in_flight_then_exits_0(models):  # noqa: F811
    proc, url = start(f"tr={models['tr']}")
    results = {}

    def translate():
        r = httpx.post(url + "/v1/translate", json=heavy_translation(), timeout=60)
        results["translate"], results["answered"] = r, time.monotonic()

    thread = threading.Thread(target=translate)
    try:
        thread.start()
        deadline = time.monotonic() + 10
        while in_flight(url) < 2:  # the translation, and this /metrics request
            assert time.monotonic() < deadline, "the request never arrived"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        try:  # a new connection is refused (or, if it slips in, told the server is stopping)
            late = httpx.post(url + "/v1/translate", json={"model": "tr", "texts": ["blue car ."]}, timeout=5)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass
        thread.join(60)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    translated = results["translate"]
    assert translated.status_code == 200 and len(translated.json()["translations"]) == 64
    assert results["answered"] > signalled  # it was answered after the signal: it was in flight


def test_sigterm_when_idle_exits_0_at_once(models):  # noqa: F811
    proc, url = start(str(models["tr"]))
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, proc.stderr.read()[-3000:]
