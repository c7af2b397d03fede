"""The ASGI layer every request passes first: body-size limit, metrics and the access log.

It is plain ASGI (not a Starlette BaseHTTPMiddleware) so it can count body bytes as they
arrive and stop a chunked upload that has no Content-Length at the limit, without buffering
it. The log line is JSON with the method, path, status, time and what the handler adds
(model, input count, tokens); it never holds request text, headers or keys.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from diffcse_runtime.serve.metrics import ServeMetrics

log = logging.getLogger("diffcse_runtime.serve")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable], Awaitable[None]]


class ApiError(HTTPException):
    """An error answered with OpenAI's error JSON; a Starlette HTTPException so FastAPI lets
    it through body parsing (the body-size limit is raised from inside `receive`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.message, self.type, self.param, self.code = message, type, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is over this server's limit of {limit} bytes; send fewer or shorter "
        "inputs per request",
        code="request_too_large",
    )


class RequestGate:
    """Wraps the app: refuses bodies over `max_body_bytes`, counts and logs every request."""

    def __init__(
        self, app: ASGIApp, metrics: ServeMetrics, max_body_bytes: int, paths: set[str]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body:
                await _send_error(send_counted, too_large(self.max_body))
                return
            await self.app(scope, self._limited(receive), send_counted)
        finally:
            self._record(scope, status, time.perf_counter() - start)

    def _limited(self, receive: Callable) -> Callable:
        """`receive` that raises 413 once the body passes the limit (chunked uploads)."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise too_large(self.max_body)
            return message

        return wrapped

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        path = scope["path"] if scope["path"] in self.paths else "other"
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.latency.labels(path).observe(seconds)
        if not log.isEnabledFor(logging.INFO):
            return
        entry = {
            "method": scope["method"],
            "path": path,
            "status": status,
            "ms": round(seconds * 1000, 2),
        }
        entry.update(scope.get("state", {}).get("log", {}))
        log.info(json.dumps(entry, separators=(",", ":")))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Callable, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
