"""A request body read whole up to a cap, then handed on: the one body cap of the demo and the
server (plain ASGI, so the demo needs neither KServe nor the server to use it)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    """The body passes the cap: answer 413, and leave the rest of it unread."""


def declared_too_large(scope: Scope, limit: int) -> bool:
    """Whether the request's Content-Length says its body passes `limit` (known before a byte
    of it is read)."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    return declared.isdigit() and int(declared) > limit


async def read_capped(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request body, read until it ends; None if the client left first. Raises BodyTooLarge
    at once when the Content-Length passes `limit`, else as soon as the bytes received do."""
    if declared_too_large(scope, limit):
        raise BodyTooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyTooLarge
        if not message.get("more_body"):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app `body` (already read) as one message, then the client's
    own messages (its disconnect, for streamed answers)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def send_json(send: Send, status: int, content: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """An answer of `status` with `content` as its JSON body."""
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
