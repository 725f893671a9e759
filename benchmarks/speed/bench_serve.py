"""Serving under load: `trainformer serve` with dynamic batching against the same server without it.

Starts ``trainformer serve MODEL`` as a subprocess on 127.0.0.1 (a free port;
nothing else is ever contacted) twice: with dynamic batching (the defaults)
and with ``--no-batching`` (one request at a time). Against each, for every
client count in ``--clients`` (default 1, 8, 32, 64): that many concurrent
clients each send one real test sentence per request, the next as soon as the
last is answered, until ``--requests`` requests have been answered (a fixed
count; ``--max-seconds`` bounds each level, which then ends early and says
so). Measured: requests/s, sentences/s, latency p50/p95/p99, errors (must be
0), the server's peak RSS (sampled from /proc every 20 ms). The test
sentences are the model's own test split (read with its config, as training
split it), or ``--sentences FILE`` (one per line).

Target (issue 25): at 32 clients, >= 4x the sentences/s of one-at-a-time
serving (the --no-batching server at 32 clients) with p99 latency under 2 s
and 0 errors. The client runs on the same machine as the server (its share of
the CPU is part of the measurement) and warms each server up first.

Writes OUT/bench_serve.json and OUT/bench_serve.md (hardware and CPU flags,
versions, commit, settings).

    python benchmarks/speed/bench_serve.py --model runs/en-fr-60/model --out benchmarks/results/serve
    python benchmarks/speed/bench_serve.py --model MODEL --sentences FILE --smoke --out /tmp/bench-serve   # seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from trainformer.bench.testset import translation_test_set
from trainformer.errors import UserError, run_script
from trainformer.rundir import git_commit, hardware, package_versions

NAME = "bench"


# ----------------------------------------------------------------------------
# Test sentences
# ----------------------------------------------------------------------------


def test_sources(model_dir: str) -> list[str]:
    """The distinct source sentences of the model's test split, as its training run split them."""
    from trainformer.modeldir import read_model_config

    cfg = read_model_config(model_dir)
    if cfg.task != "translation":
        raise UserError(f"{model_dir}: a {cfg.task!r} model; this benchmark serves a translation model")
    return translation_test_set(Path(model_dir))[0]


# ----------------------------------------------------------------------------
# The server process
# ----------------------------------------------------------------------------


class Server:
    """``trainformer serve`` in a subprocess on loopback; its stderr goes to a log file."""

    def __init__(self, model: str, extra: list[str], log: Path, threads: int):
        self.log = log
        cmd = [sys.executable, "-m", "trainformer", "serve", f"{NAME}={model}", "--host", "127.0.0.1",
               "--port", "0", "--no-access-log", "--log-level", "warning", *extra]
        if threads:
            cmd += ["--threads", str(threads)]
        self.cmd = cmd
        env = {k: v for k, v in os.environ.items() if k != "TRAINFORMER_API_KEY"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
        self.url = self._wait_url()

    def _wait_url(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log.read_text())
            if match:
                url = match.group(1)
                while time.monotonic() < deadline:
                    try:
                        if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                            return url
                    except httpx.TransportError:
                        pass
                    time.sleep(0.1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise UserError(f"the server did not become ready: {self.log.read_text()[-2000:]}")

    def rss_mib(self, field: str = "VmRSS") -> float:
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return float("nan")
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) / 1024 if match else float("nan")

    def stop(self) -> int | None:
        """SIGTERM (graceful); the exit status (0 expected)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class PeakRss:
    """Samples a server's RSS every 20 ms in a thread while the block runs."""

    def __init__(self, server: Server):
        self.server, self.peak, self._stop = server, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_mib())
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


# ----------------------------------------------------------------------------
# The load
# ----------------------------------------------------------------------------


async def load(url: str, sentences: list[str], clients: int, total: int, texts_per_request: int,
               max_seconds: float, beam: int | None) -> dict[str, Any]:
    """`clients` concurrent loops of request -> answer -> next request, `total` requests in all."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    start = time.perf_counter()
    stop_at = start + max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < stop_at:
            i = issued
            issued += 1
            texts = [sentences[(i * texts_per_request + k) % len(sentences)] for k in range(texts_per_request)]
            body: dict[str, Any] = {"model": NAME, "texts": texts}
            if beam:
                body["beam"] = beam
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/translate", json=body)
                ok = r.status_code == 200 and len(r.json()["translations"]) == len(texts)
                if not ok:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except (httpx.HTTPError, ValueError, KeyError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    done = len(latencies)
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "clients": clients, "requests": done, "errors": len(errors), "first_errors": errors[:5],
        "seconds": round(elapsed, 3), "stopped_early": issued < total,
        "requests_per_s": round(done / elapsed, 2), "sentences_per_s": round(done * texts_per_request / elapsed, 2),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
        "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1),
    }


def run_server(label: str, args, extra: list[str], sentences: list[str], out: Path) -> dict[str, Any]:
    server = Server(args.model, extra, out / f"server-{label}.log", args.threads)
    print(f"[{label}] {' '.join(server.cmd)}  ->  {server.url}", flush=True)
    levels = []
    try:
        asyncio.run(load(server.url, sentences, 4, args.warmup, args.texts_per_request, args.max_seconds, args.beam))
        time.sleep(1.5)  # the batcher expects company for 1 s after concurrent requests: let it forget
        for clients in args.clients:
            with PeakRss(server) as rss:
                level = asyncio.run(load(server.url, sentences, clients, args.requests, args.texts_per_request,
                                         args.max_seconds, args.beam))
            level["peak_rss_mib"] = round(rss.peak, 1)
            levels.append(level)
            print(f"[{label}] {clients:>3} clients: {level['sentences_per_s']:8.1f} sentences/s, "
                  f"p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms, errors {level['errors']}, "
                  f"peak RSS {level['peak_rss_mib']:.0f} MiB" + ("  (stopped at --max-seconds)"
                                                                 if level["stopped_early"] else ""), flush=True)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        peak_all = server.rss_mib("VmHWM")
        status = server.stop()
    return {"command": server.cmd, "levels": levels, "exit_status": status, "peak_rss_mib": round(peak_all, 1),
            "mean_batch_requests": mean_batch(metrics)}


def mean_batch(metrics: str) -> float | None:
    """Mean requests per batch over the server's life, from its /metrics."""
    s = re.search(rf'^trainformer_batch_requests_sum{{model="{NAME}"}} (\S+)$', metrics, re.M)
    c = re.search(rf'^trainformer_batch_requests_count{{model="{NAME}"}} (\S+)$', metrics, re.M)
    return round(float(s.group(1)) / float(c.group(1)), 2) if s and c and float(c.group(1)) else None


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def verdict(result: dict[str, Any], clients: int = 32) -> dict[str, Any] | None:
    on = {lv["clients"]: lv for lv in result["batching"]["levels"]}
    off = {lv["clients"]: lv for lv in result["no_batching"]["levels"]}
    if clients not in on or clients not in off:
        return None
    speedup = on[clients]["sentences_per_s"] / max(off[clients]["sentences_per_s"], 1e-9)
    errors = sum(lv["errors"] for run in ("batching", "no_batching") for lv in result[run]["levels"])
    p99 = on[clients]["p99_ms"] / 1000
    return {"clients": clients, "speedup": round(speedup, 2), "p99_s": round(p99, 3), "errors": errors,
            "met": speedup >= 4 and p99 < 2 and errors == 0}


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = [
        "# Serving benchmark: dynamic batching against one request at a time", "",
        f"Model: `{result['model']}` ({result['sentences']} test sentences, "
        f"{result['texts_per_request']} per request, beam {result['beam'] or 'the model default'}); "
        f"{result['requests']} requests per level.",
        f"Hardware: {hw.get('cpu')} ({hw.get('cpu_count')} cores; flags {', '.join(hw.get('cpu_flags', [])) or 'none'}); "
        f"torch threads in the server: {result['threads'] or 'default'}. Client and server share the machine.", "",
        "| server | clients | requests/s | sentences/s | p50 ms | p95 ms | p99 ms | errors | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, label in (("batching", "dynamic batching"), ("no_batching", "--no-batching")):
        for lv in result[run]["levels"]:
            lines.append(f"| {label} | {lv['clients']} | {lv['requests_per_s']} | {lv['sentences_per_s']} | "
                         f"{lv['p50_ms']} | {lv['p95_ms']} | {lv['p99_ms']} | {lv['errors']} | {lv['peak_rss_mib']} |"
                         + (" (stopped at the time limit)" if lv["stopped_early"] else ""))
    lines.append("")
    lines.append(f"Mean requests per batch: {result['batching']['mean_batch_requests']} with batching, "
                 f"{result['no_batching']['mean_batch_requests']} without. Exit status after SIGTERM: "
                 f"{result['batching']['exit_status']} and {result['no_batching']['exit_status']}.")
    v = result.get("verdict")
    if v:
        lines += ["", f"At {v['clients']} clients: **{v['speedup']}x** the sentences/s of one-at-a-time serving, "
                  f"p99 {v['p99_s']} s, {v['errors']} errors in all. Target (>= 4x, p99 < 2 s, 0 errors): "
                  f"**{'met' if v['met'] else 'not met'}**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a translation model/ or run directory")
    ap.add_argument("--sentences", default=None, help="one sentence per line (default: the model's test split)")
    ap.add_argument("--clients", default="1,8,32,64", help="concurrent clients per level (default 1,8,32,64)")
    ap.add_argument("--requests", type=int, default=1024, help="requests answered per level (default 1024)")
    ap.add_argument("--warmup", type=int, default=32, help="requests sent before measuring each server")
    ap.add_argument("--texts-per-request", type=int, default=1)
    ap.add_argument("--beam", type=int, default=None, help="beam size (default: the model's eval.beam)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="time limit of one level (default 300)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the server (0: its default)")
    ap.add_argument("--serve-args", default="", help="more flags for the batching server, e.g. '--max-wait-ms 10'")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: clients 1,4, 24 requests, 4 warm-up")
    ap.add_argument("--out", default="benchmarks/results/serve")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.requests, args.warmup = "1,4", 24, 4
    args.clients = [int(c) for c in str(args.clients).split(",")]
    if min(args.clients) < 1 or args.requests < 1 or args.texts_per_request < 1:
        raise UserError("--clients, --requests and --texts-per-request: expected integers >= 1")
    if args.sentences:
        sentences = [s for s in Path(args.sentences).read_text(encoding="utf-8").splitlines() if s.strip()]
    else:
        sentences = test_sources(args.model)
    if not sentences:
        raise UserError("no test sentences")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": args.model, "sentences": len(sentences), "requests": args.requests, "clients": args.clients,
        "texts_per_request": args.texts_per_request, "beam": args.beam, "threads": args.threads,
        "smoke": args.smoke, "hardware": hardware(), "versions": package_versions(), "commit": git_commit(),
    }
    result["batching"] = run_server("batching", args, args.serve_args.split(), sentences, out)
    result["no_batching"] = run_server("no-batching", args, ["--no-batching"], sentences, out)
    result["verdict"] = verdict(result)
    (out / "bench_serve.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "bench_serve.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    print(f"wrote {out / 'bench_serve.json'} and {out / 'bench_serve.md'}")


if __name__ == "__main__":
    run_script(main, "bench_serve")
