"""Running the app under uvicorn: binding, graceful SIGTERM, exposure warning."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import uvicorn

from trainformer.errors import UserError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server would be reachable beyond this machine without a key, else None."""
    if api_key or is_loopback(host):
        return None
    return (f"listening on {host} without --api-key: anyone who can reach this address can use the "
            "models; pass --api-key KEY (or set TRAINFORMER_API_KEY) to require it")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), or a `UserError` saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn's server, ending with exit status 0 after a signal.

    On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets the
    requests in flight finish (at most ``timeout_graceful_shutdown`` seconds),
    runs the app's shutdown, and then raises the signal again, so the process
    dies of it (status 143). A server asked to stop that stopped cleanly has
    succeeded: we keep everything but that last step. `on_signal` runs as the
    signal arrives (the app refuses new work from then on).
    """

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_signal = on_signal

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self.on_signal is not None:
            self.on_signal()
        super().handle_exit(sig, frame)


def make_server(app, shutdown_timeout: float = 30.0, log_level: str = "info", access_log: bool = True,
                on_signal: Callable[[], None] | None = None) -> GracefulServer:
    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=int(max(shutdown_timeout, 1)), server_header=False)
    return GracefulServer(config, on_signal)
