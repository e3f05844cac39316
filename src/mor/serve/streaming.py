"""Server-sent events and connection handling for the HTTP app: the ``data: {...}`` chunk
format, interleaving several request streams, a response that cancels its requests when the
client goes away, and the API-key middleware."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .bridge import EngineDead, RequestStream, Token
from .protocol import APIError


def sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()) + b"\n\n"


async def interleave(streams: list[RequestStream], first: Callable[[int], dict | None],
                  piece: Callable[[int, Token], dict], final: Callable[[int], dict | None]) -> AsyncIterator[bytes]:
    """Server-sent events of several streams, interleaved as their tokens arrive."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, s: RequestStream) -> None:
        try:
            async for t in s:
                q.put_nowait((k, t))
        except Exception as e:
            q.put_nowait((k, e))
        q.put_nowait((k, None))

    for k in range(len(streams)):
        c = first(k)
        if c is not None:
            yield sse(c)
    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left, n_out = len(streams), 0
        while left:
            k, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                err = APIError(503 if isinstance(item, EngineDead) else 500, str(item), None, "engine_dead")
                yield sse(err.body())
                break
            else:
                n_out += 1
                yield sse(piece(k, item))
        else:
            c = final(n_out)
            if c is not None:
                yield sse(c)
        yield sse(b"[DONE]")
    finally:
        for t in tasks:
            t.cancel()


async def disconnected(request: Request) -> None:
    """Returns when the client closed the connection (the body was read already)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class APIKeyMiddleware:
    """ASGI middleware: ``Authorization: Bearer KEY`` on /v1/*, /tokenize and /detokenize
    (checked before the body is read, so a bad key is a 401 whatever the body)."""

    def __init__(self, app, key: str, on_fail: Callable[[APIError], Response]):
        self.app, self.key, self.on_fail = app, key.encode(), on_fail

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = got[7:] if got[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                resp = self.on_fail(APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                             None, "invalid_api_key"))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that cancels its requests when the client goes away
    (watching the connection, not only failed writes), when the server cancels it, or
    when it ends."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(body, status_code=200, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def write() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        writer, watcher = asyncio.ensure_future(write()), asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done:
                exc = writer.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
        finally:
            writer.cancel()
            watcher.cancel()
            self.on_close()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            await self.body_iterator.aclose()
