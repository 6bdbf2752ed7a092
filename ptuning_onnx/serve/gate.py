"""The ASGI layer in front of the routes: the drain (503), the body limit (413), the API key (401), metrics.

A plain ASGI wrapper rather than Starlette's ``BaseHTTPMiddleware``: streams pass through untouched, and the
client's disconnect still reaches the streaming response (which then cancels its rows).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, Callable

from .service import Service, error_body

log = logging.getLogger("ptuning_onnx.serve")

PROBES = ("/healthz", "/metrics")  # answered while draining, never counted as in flight
ENDPOINTS = {"/healthz", "/readyz", "/metrics", "/v1/model", "/v1/models", "/v1/generate", "/v1/completions",
             "/v1/classify", "/v1/tag", "/v1/embed", "/v1/embeddings", "/docs", "/openapi.json"}


async def send_json(send: Callable, status: int, body: dict, headers: tuple = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class Gate:
    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        svc, path = self.service, scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]  # what an exception that escapes everything amounts to

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = path not in PROBES
        svc.inflight += counted
        svc.metrics.inflight.inc(counted)
        start = time.perf_counter()
        try:
            await self._gate(scope, receive, send_status, path)
        except Exception as exc:  # the routes answer every error themselves; this is a last resort, one line
            log.error("ptuning-serve: %s %s failed: %s: %s", scope.get("method"), path, type(exc).__name__, exc)
            if status[0] == 500:
                try:
                    await send_json(send_status, 500, error_body(500, f"internal error: {type(exc).__name__}"))
                except Exception:  # the response had started; the connection is what it is
                    pass
        finally:
            svc.inflight -= counted
            svc.metrics.inflight.dec(counted)
            svc.metrics.observe(endpoint, status[0], time.perf_counter() - start)

    async def _gate(self, scope: dict, receive: Callable, send: Callable, path: str) -> None:
        svc, cfg = self.service, self.service.config
        if svc.draining and path not in PROBES:
            await send_json(send, 503, error_body(503, "the server is shutting down"), ((b"connection", b"close"),))
            return
        if cfg.api_key is not None and path.startswith("/v1/") and not _authorized(scope, cfg.api_key):
            await send_json(send, 401, error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'"),
                            ((b"www-authenticate", b"Bearer"),))
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        limit = cfg.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_json(send, 413, error_body(413, f"request body of {int(declared)} bytes exceeds the limit of "
                                                       f"{limit} bytes (--max-body-bytes)"))
            return
        # Read the body here (bounded), so that a chunked body without a length is held to the limit as well.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await send_json(send, 413, error_body(413, f"request body exceeds the limit of {limit} bytes "
                                                           "(--max-body-bytes)"))
                return
        if scope.get("method") == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
            # Every POST here takes JSON; read it as JSON whatever the client declared (curl -d says a form).
            scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, which a streaming response listens for

        await self.app(scope, replay, send)


def _authorized(scope: dict, key: str) -> bool:
    headers = dict(scope.get("headers") or [])
    given = headers.get(b"authorization", b"")
    if given[:7].lower() == b"bearer ":
        given = given[7:].strip()
    else:
        given = headers.get(b"x-api-key", b"")
    return hmac.compare_digest(given, key.encode())
