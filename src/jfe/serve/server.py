"""Run an app with uvicorn in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

# Idle keep-alive connections are held this long. Longer than common clients' own idle expiry (httpx: 5 s,
# browsers: 60 s or more): with uvicorn's default of 5 s, a client reusing a connection just as the server
# closed it got "connection reset" (measured: 1-3 dropped requests a minute at concurrency 32).
KEEP_ALIVE_S = 75


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``.

    Starts uvicorn on ``host:port`` (a free loopback port by default) in a daemon thread, waits until it
    accepts connections, and shuts it down (running the app's lifespan shutdown) on exit.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
                 startup_timeout: float = 30.0) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level, access_log=False,
                                     lifespan="on", timeout_keep_alive=KEEP_ALIVE_S)
        self.server = uvicorn.Server(self.config)
        self.startup_timeout = startup_timeout
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self.server.run, name="jfe-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url} (port in use?)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url} within {self.startup_timeout} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
