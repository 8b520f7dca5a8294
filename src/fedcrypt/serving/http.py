"""Run an ASGI app (the board, the model server) under uvicorn on a socket bound up front, so a
busy port is a clear error and port 0 picks a free one; in the foreground or in a thread."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any

import uvicorn


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class HttpServer:
    """uvicorn serving ``app`` on ``host:port`` (HTTPS with ``certfile`` and ``keyfile``)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, certfile: str | None = None,
                 keyfile: str | None = None, access_log: bool = False) -> None:
        if (certfile is None) != (keyfile is None):
            raise ValueError("give both --certfile and --keyfile for HTTPS, or neither")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
            self._socket.listen(2048)  # connections queue from now on, before uvicorn takes over
        except OSError as exc:
            self._socket.close()
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port = self._socket.getsockname()[1]
        self.scheme = "https" if certfile else "http"
        config = uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="off", ws="none",
                                ssl_certfile=certfile, ssl_keyfile=keyfile)
        try:
            config.load()  # unreadable certificates fail here, not in the serving loop
        except OSError as exc:
            self._socket.close()
            raise OSError(f"cannot use TLS certificate {certfile} with key {keyfile}: {exc}") from None
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def run(self) -> None:
        """Serve until Ctrl-C (or :meth:`stop` from another thread)."""
        self._server.run(sockets=[self._socket])

    def start(self, timeout: float = 10.0) -> HttpServer:
        """Serve in a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.run, name=f"http-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.url} did not start within {timeout:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
