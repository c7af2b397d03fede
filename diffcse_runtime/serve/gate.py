"""The ASGI layer every request passes first: who may call, body limits, metrics, the log.

In order: the Host header must name this server (`allowed_hosts`: a web page that rebinds
its own name to 127.0.0.1 sends its own name); a request from a browser page (an `Origin`
header) is served, and its CORS preflight answered, only for `cors_origins`; a POST body
must be JSON (a cross-origin text/plain or form POST needs no preflight, so it must not
run); then the body-size limit. Every refusal is OpenAI's error JSON.

It is plain ASGI (not a Starlette BaseHTTPMiddleware) so it can count body bytes as they
arrive and stop a chunked upload that has no Content-Length at the limit, without buffering
it, and answer a body still arriving when the server stops with a 503 at once. The log line
is JSON with the method, path, status, time and what the handler adds (model, input count,
tokens); it never holds request text, headers or keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.serve.metrics import ServeMetrics

log = logging.getLogger("diffcse_runtime.serve")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CORS_HEADERS = "authorization, content-type"
EXPOSED_HEADERS = "x-diffcse-truncated, retry-after"
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


def check_api_key(key: str, source: str) -> str:
    """`key` as given, or a DiffcseError naming `source` (the option, variable or file).

    A key is one opaque string: never split or trimmed. Empty or blank is refused (it
    would read as "no authentication"), and so is anything an HTTP header cannot carry.
    """
    if not key.strip():
        raise DiffcseError(f"{source}: the API key is empty or only whitespace; give a key")
    if key != key.strip():
        raise DiffcseError(
            f"{source}: the API key begins or ends with whitespace, which HTTP drops from "
            "the Authorization header; remove it"
        )
    if not all(" " <= c <= "~" for c in key):
        raise DiffcseError(
            f"{source}: the API key holds a character other than printable ASCII, which an "
            "Authorization header cannot carry"
        )
    return key


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is over this server's limit of {limit} bytes; send fewer or shorter "
        "inputs per request",
        code="request_too_large",
    )


class Stopping:
    """Set once the server begins to shut down; safe to set from a signal handler or thread.

    Requests whose body is still arriving then get a 503 at once, instead of holding the
    shutdown for the whole grace period and being cancelled into a traceback.
    """

    def __init__(self) -> None:
        self.is_set = False
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        """Attach to the running loop (the app's start-up)."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        if self.is_set:
            self._event.set()

    def set(self) -> None:
        self.is_set = True
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self) -> None:
        if self._event is None:
            await asyncio.Event().wait()  # never bound: never set for this loop
        else:
            await self._event.wait()


def shutting_down() -> ApiError:
    return ApiError(
        503,
        "the server is shutting down; retry the request",
        type="server_error",
        code="shutting_down",
        headers={"Connection": "close"},
    )


@dataclass(frozen=True)
class Access:
    """Who may call: Host names (`*`: any) and browser origins allowed CORS."""

    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    cors_origins: tuple[str, ...] = ()

    def host_ok(self, host: str | None) -> bool:
        if host is None or "*" in self.allowed_hosts:
            return True
        return _host_name(host) in {h.lower().strip("[]") for h in self.allowed_hosts}

    def origin_ok(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin in self.cors_origins


class RequestGate:
    """Wraps the app: Host, Origin, content-type and body-size checks, metrics and the log."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServeMetrics,
        max_body_bytes: int,
        paths: set[str],
        access: Access | None = None,
        stopping: Stopping | None = None,
        body_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.paths = paths
        self.access = access or Access()
        self.stopping = stopping or Stopping()
        self.body_timeout = body_timeout_s

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False
        headers = _headers(scope)
        origin = headers.get("origin")
        cors = origin is not None and self.access.origin_ok(origin)

        async def send_counted(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                if cors:
                    message = _with_cors(message, origin)
            await send(message)

        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await _send_error(send_counted, refusal)
                return
            if origin is not None and scope["method"] == "OPTIONS":
                await _send_preflight(send_counted)  # an allowed origin's preflight
                return
            try:
                await self.app(scope, self._limited(receive), send_counted)
            except asyncio.CancelledError:
                # the grace period ran out with this request unanswered: say so in JSON
                # instead of uvicorn's logged traceback and plain-text 500
                if started:
                    raise
                await _send_error(send_counted, shutting_down())
        finally:
            self._record(scope, status, time.perf_counter() - start)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> ApiError | None:
        """The first reason to refuse the request before reading its body, if any."""
        host = headers.get("host")
        if not self.access.host_ok(host):
            return ApiError(
                400,
                f"Host {host!r} is not served here; start the server with --allowed-hosts "
                "naming it (a web page can point any name at this address)",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not self.access.origin_ok(origin):
            return ApiError(
                403,
                f"requests from web pages at {origin!r} are not allowed; start the server "
                "with --cors-origins naming the origin to allow it",
                code="origin_not_allowed",
            )
        if scope["method"] in ("POST", "PUT", "PATCH") and not _is_json(
            headers.get("content-type")
        ):
            return ApiError(
                415,
                "the request body must be JSON: send 'Content-Type: application/json' "
                "(curl: --json, or -H 'Content-Type: application/json')",
                code="unsupported_media_type",
            )
        declared = _content_length(headers)
        if declared is not None and declared > self.max_body:
            return too_large(self.max_body)
        return None

    def _limited(self, receive: Callable) -> Callable:
        """`receive` that raises 413 once the body passes the limit (chunked uploads), 408
        if the whole body has not arrived within `body_timeout_s` (a client that stalls
        would hold its connection and memory for ever), and 503 if the server starts
        shutting down while the body is still arriving."""
        seen = 0
        done = False
        deadline = time.monotonic() + self.body_timeout

        async def wrapped() -> Message:
            nonlocal seen, done
            message = await (receive() if done else self._body_part(receive, deadline))
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise too_large(self.max_body)
                done = not message.get("more_body", False)
            return message

        return wrapped

    async def _body_part(self, receive: Callable, deadline: float) -> Message:
        """The next body message, unless the server starts stopping or the deadline passes
        first."""
        if self.stopping.is_set:
            raise shutting_down()
        part = asyncio.ensure_future(receive())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait(
                {part, stop},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop.cancel()
            if not part.done():
                part.cancel()
        if part.done() and not part.cancelled():
            return part.result()
        if self.stopping.is_set:
            raise shutting_down()
        raise ApiError(
            408,
            f"the request body did not arrive within {self.body_timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        )

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


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers this layer reads, lower-cased names, first value of each."""
    wanted = {b"host", b"origin", b"content-type", b"content-length"}
    found: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        if name in wanted and name.decode() not in found:
            found[name.decode()] = value.decode("latin-1")
    return found


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: 'a:80' -> 'a', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _with_cors(message: Message, origin: str) -> Message:
    headers = list(message.get("headers", []))
    headers += [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
        (b"vary", b"origin"),
    ]
    return {**message, "headers": headers}


async def _send_preflight(send: Callable) -> None:
    headers = [
        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (b"access-control-allow-headers", CORS_HEADERS.encode()),
        (b"access-control-max-age", b"600"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _content_length(headers: dict[str, str]) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


async def _send_error(send: Callable, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers.append((b"connection", b"close"))
    for name, value in (error.headers or {}).items():
        if name.lower() != "connection":
            headers.append((name.lower().encode(), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
