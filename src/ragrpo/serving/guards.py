"""The server's guards, as plain ASGI middleware and small helpers: the API key, the body size limit,
OpenAI-shaped errors, taking a turn at the one-at-a-time model while watching for the client leaving, and
the two reply pieces both chat paths send (a server-sent event, labelled sources).

Plain ASGI, not Starlette's `BaseHTTPMiddleware`, which hides a client's disconnect from the endpoint
(it then generated on for nobody).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import threading

from fastapi.responses import JSONResponse


def sse(payload) -> str:
    """One server-sent event holding `payload` (JSON, or a string such as "[DONE]" as it is)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, default=str)}\n\n"


def labelled(rows: list[dict]) -> list[dict]:
    """The rows an answer cites, each with its `label` ('Title (1987)')."""
    from ragrpo.prompts import source_label

    return [{"label": source_label(row), **row} for row in rows]


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Guard:
    """The API key, as plain ASGI middleware (see the module's note on why not `BaseHTTPMiddleware`);
    `BodyLimit` bounds the body."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.api_key and scope.get("path", "").startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                return await _reply(send, ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                                   code="invalid_api_key"))
        return await self.app(scope, receive, send)


async def _reply(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, counted as they arrive. Content-Length alone
    is not enough: a chunked body has none, so the body is read here (at most `limit` bytes are held) and
    handed on whole; later `receive` calls (disconnect checks) go to the client as before."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the whole body
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse(ApiError(413, f"the request body is over {self.limit} bytes").body(), status_code=413,
                                headers={"Connection": "close"})  # the rest of the body is not read
        await response(scope, receive, send)


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


async def take_turn(lock: asyncio.Lock, client_gone, poll: float = 0.1) -> bool:
    """Acquire `lock` in arrival order, asking `client_gone()` every `poll` seconds meanwhile: False (and the
    lock not held) when the client left first. One acquire waits throughout, so the place in line is kept; a
    non-streaming client has no other watcher, and without this it was seen leaving only at its turn."""
    acquire = asyncio.ensure_future(lock.acquire())
    held = False
    try:
        while True:
            if (await asyncio.wait({acquire}, timeout=poll))[0]:
                held = True
                return True
            if await client_gone():
                return False
    finally:
        if not held:  # the client left, or this waiter was cancelled
            if acquire.done() and not acquire.cancelled():
                lock.release()  # granted while the leaving was being noticed: pass it on
            else:
                acquire.cancel()  # a cancelled acquire never holds the lock


async def within(func, deadline: float):
    """`func()` run on a thread of its own, awaited for at most `deadline` seconds (then TimeoutError).

    Python cannot stop a thread, so a call that never returns (a hung LanceDB query) keeps its thread; but
    that thread is a daemon of its own, not one of the shared executor's few workers, so the calls after it
    are not queued behind it and shutdown does not wait for it."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        if not done.set_running_or_notify_cancel():  # running, it can no longer be cancelled by a timeout
            return
        try:
            done.set_result(func())
        except BaseException as exc:  # handed to the awaiting request, which turns it into an HTTP error
            done.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="ragrpo-retrieval").start()
    return await asyncio.wait_for(asyncio.wrap_future(done), deadline)
