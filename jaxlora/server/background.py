"""Runs the app with uvicorn in a background thread on a loopback socket (tests, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from jaxlora.errors import ConfigError


class BackgroundServer:
    """uvicorn serving app on host:port (port 0: an ephemeral port) from a daemon thread.

    ``start()`` returns once the server accepts connections (and, for an app that manages its
    engine, once the engine runs: the app's start-up has finished); ``stop()`` shuts it down
    gracefully, which stops the engine. Also a context manager.
    """

    def __init__(
        self,
        app,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        timeout_graceful_shutdown: float = 5.0,
    ):
        self.app = app
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # (IPv6: "::1", "::")
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise ConfigError(f"server address {host}:{port}: cannot bind ({e.strerror})") from e
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=timeout_graceful_shutdown,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as base_url."""
        return f"{self.url}/v1"

    def start(self, timeout: float = 600.0) -> BackgroundServer:
        self._thread = threading.Thread(target=self._run, name="jaxlora-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                self.stop()  # (the socket, still bound, and the thread)
                raise ConfigError(f"server on {self.url} failed to start (see the log)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server on {self.url} not started after {timeout} s")
            time.sleep(0.01)
        return self

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except SystemExit:  # uvicorn's exit on a failed start-up (it logged why): start() says
            pass

    def stop(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
