"""uvicorn, with a drain: the first SIGTERM (or Ctrl-C) makes every new request a 503 while the ones in flight
finish; the server then stops listening and the process exits 0. A second signal stops waiting.

uvicorn's own handler shuts the listener at once (new clients are refused, not answered) and re-raises the signal
after shutdown, which ends the process by SIGTERM instead of exit 0; so this server installs its own.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from typing import Any, Optional

import uvicorn

from ..errors import ConfigError
from .app import create_app
from .service import ServeConfig, Service

log = logging.getLogger("ptuning_onnx.serve")
DRAIN_TIMEOUT_S = 60.0  # a request still running after this is cut off by the shutdown


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.drain_since: Optional[float] = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drain_since is None:
            self.drain_since = time.monotonic()
            self.service.draining = True
            log.info("ptuning-serve: draining (%d requests in flight)", self.service.inflight)
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        svc = self.service
        if svc.fatal is not None:
            self.should_exit = True
        if self.drain_since is not None and (svc.inflight == 0 or
                                             time.monotonic() - self.drain_since > DRAIN_TIMEOUT_S):
            self.should_exit = True
        return await super().on_tick(counter)


def listen(host: str, port: int) -> socket.socket:
    """Bind before anything loads, so that a port in use is a one-line error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> tuple[int, Optional[str]]:
    """Run until drained or failed; returns (exit code, error message or None)."""
    sock = listen(host, port)
    app, service = create_app(config)
    uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=5)
    server = DrainingServer(uv, service)
    bound = sock.getsockname()
    log.info("ptuning-serve: listening on http://%s:%d (%s)", bound[0], bound[1], config.folder)
    server.run(sockets=[sock])
    if service.fatal is not None:
        return service.fatal
    return 0, None
