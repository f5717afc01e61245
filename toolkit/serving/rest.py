"""The REST side of the server, in front of KServe's app: `HeaderGuard` (the HTTP protocol, with
limits on a request's line and headers), `ProtocolGuard` (the body cap, request validation,
counting, and infer requests straight to KServe's data plane) and the routes this server adds."""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from starlette.requests import Request  # at module level: FastAPI resolves handlers' annotations here
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from toolkit.core.bodycap import BodyTooLarge, Message, Receive, Scope, Send, read_capped, replaying, send_json
from toolkit.serving.kserve_adapter import exception_handler
from toolkit.serving.metrics import counted
from toolkit.serving.oip import ExportModel, TensorModel
from toolkit.serving.options import (
    BODY_TIMEOUT_S,
    CLIENT_GONE,
    HEADER_TIMEOUT_S,
    INLINE_JSON_BYTES,
    MAX_BODY,
    MAX_HEADER_BYTES,
)
from toolkit.serving.validation import binary_request_problem, invalid_request_message, json_request
from toolkit.serving.workers import METRICS_DIR_ENV

log = logging.getLogger("toolkit.serve")

_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")
_BINARY_HEADER = b"inference-header-content-length"
_SERVED_PATHS = ("/v2/", "/metrics")


async def _answer(send: Send, status: int, message: str, unread_body: bool = False) -> None:
    # The body was left unread (as after a 408 or 413): the connection's next bytes are not a
    # request, and a client trickling them would hold it open forever.
    close = [(b"connection", b"close")] if unread_body or status in (408, 413) else []
    await send_json(send, status, {"error": message}, close)


def _has_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() not in (b"", b"0")


class HeaderGuard(HttpToolsProtocol):
    """uvicorn's HTTP protocol (httptools, as KServe runs it) with the limits it lacks on a
    request's line and headers: over MAX_HEADER_BYTES a 431, not complete within
    HEADER_TIMEOUT_S a 408 (a connection that sent nothing is closed); both close the
    connection. Without them a connection sending its headers slowly stayed open forever, and
    a 160 MB header took 27 s to refuse."""

    header_bytes = 0
    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.header_timer is not None:
            self.header_bytes += len(data)
        super().data_received(data)  # may complete the headers, or begin a pipelined request's
        if self.header_timer is not None and self.header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, f"the request's line and headers exceed {MAX_HEADER_BYTES} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._headers_done()
        super().on_headers_complete()

    def _await_headers(self) -> None:
        if self.header_timer is None:
            self.header_bytes = 0
            self.header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

    def _headers_done(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if self.header_bytes:
            self._refuse(408, f"the request's headers did not arrive within {HEADER_TIMEOUT_S} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        self._headers_done()
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, http.HTTPStatus(status).phrase.encode(),
                                                                 len(body), body))
        self.transport.close()


class ProtocolGuard:
    """ASGI app in front of KServe's (FastAPI) app: bodies over `limit` get a 413 unread, malformed
    binary framing a 400, a body without a content type is read as JSON (tritonclient's JSON
    mode sends none), anything unexpected a 500 that keeps the connection; infer requests are
    counted and timed by model and status (`counted`), and logged at debug level.

    Infer requests to a served model go straight to KServe's data plane, as KServe's own
    endpoint sends them (decode, infer, encode, its exception handlers), without FastAPI's
    routing, dependency and serialization layers: those took half the server's time per
    request. Every other request goes to KServe's app."""

    def __init__(self, app: Callable[..., Awaitable[None]], dataplane: Any, limit: int = MAX_BODY,
                 models: Mapping[str, ExportModel] | None = None) -> None:
        self.app, self.dataplane, self.limit, self.models = app, dataplane, limit, models or {}
        # Large JSON bodies are parsed off the event loop, one at a time: each takes seconds
        # and ~20 times its size in memory at the cap.
        self.parsing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        infer = _INFER_PATH.match(scope["path"])
        if not infer:
            await self._answered(scope, receive, send)
            return
        # Series only for the served models: a name in a URL must not create metrics.
        model = infer.group(1) if infer.group(1) in self.models else "unknown"
        with counted(model, "rest") as outcome:
            outcome["status"] = str(await self._answered(scope, receive, send))

    async def _answered(self, scope: Scope, receive: Receive, send: Send) -> int:
        """The request answered (or a 500 if something unexpected broke); its status."""
        status = 500

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            status = await self._guarded(scope, receive, tracked) or status
        except Exception:
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if status == 500:  # nothing sent yet
                with contextlib.suppress(Exception):
                    await _answer(send, 500, "internal error; the server log has the details")
        return status

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> int | None:
        """Answers the request; returns CLIENT_GONE when the client left before its answer."""
        if not scope["path"].startswith(_SERVED_PATHS):  # KServe's v1 and docs routes: not this server's
            await _answer(send, 404, f"not found: {scope['path'][:100]}; this server speaks the v2 protocol",
                          _has_body(scope))
            return None
        if scope["method"] != "POST":
            if _has_body(scope):  # no such route reads one: the body cap and time limit would never apply
                await _answer(send, 400, f"a {scope['method'][:10]} request takes no body", unread_body=True)
                return None
            await self.app(scope, receive, send)
            return None
        try:
            body = await asyncio.wait_for(read_capped(scope, receive, self.limit), BODY_TIMEOUT_S)
        except BodyTooLarge:
            await _answer(send, 413, f"the request body exceeds {self.limit} bytes")
            return None
        except asyncio.TimeoutError:
            await _answer(send, 408, f"the request body did not arrive within {BODY_TIMEOUT_S} s")
            return None
        if body is None:
            return CLIENT_GONE
        infer = _INFER_PATH.match(scope["path"])
        if infer and infer.group(1) not in self.models:  # before the body's checks, as for GET
            await _answer(send, 404, f"Model with name {infer.group(1)[:100]} does not exist; this server serves "
                          f"{', '.join(sorted(self.models))}")
            return None
        headers = dict(scope["headers"])
        if sum(name == _BINARY_HEADER for name, _ in scope["headers"]) > 1:
            await _answer(send, 400, "Inference-Header-Content-Length is sent more than once")
            return None
        binary = _BINARY_HEADER in headers
        if binary:
            problem = binary_request_problem(headers[_BINARY_HEADER], body, infer and self.models.get(infer.group(1)))
            if problem:
                await _answer(send, 400, problem)
                return None
        elif headers.get(b"content-type", b"").split(b";")[0].strip() != b"application/json":
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        if infer and "/versions/" not in scope["path"]:  # versions: KServe answers those with a 501
            return await self._infer(scope, receive, send, self.models[infer.group(1)], body, binary)
        if len(body) > INLINE_JSON_BYTES:  # FastAPI would parse it on the event loop, for a route that needs none
            await _answer(send, 413, f"the request body exceeds {INLINE_JSON_BYTES} bytes, the most this route takes")
            return None
        await self.app(scope, replaying(body, receive), send)
        return None

    async def _infer(self, scope: Scope, receive: Receive, send: Send, model: ExportModel, body: bytes,
                     binary: bool) -> int | None:
        """One infer request through KServe's data plane, as KServe's REST endpoint runs it."""
        from kserve.errors import ModelNotReady

        model_name = model.name
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1"), value.decode("latin-1"))
        client_gone = asyncio.ensure_future(receive())  # an http.disconnect, once the client leaves
        try:
            if binary:
                request_body: Any = body
            elif len(body) <= INLINE_JSON_BYTES:
                request_body = json_request(body, model)
            else:
                request_body = await asyncio.get_running_loop().run_in_executor(self.parsing, json_request, body,
                                                                                model)
            if not await self.dataplane.model_ready(model_name, True):
                raise ModelNotReady(model_name)
            request, _ = self.dataplane.decode(request_body, headers, protocol_version="v2", model_name=model_name)
            response, response_headers = await self.dataplane.infer(model_name=model_name, request=request,
                                                                    headers=headers)
            if client_gone.done():
                return CLIENT_GONE
            encoded, encoded_headers = self.dataplane.encode(model_name=model_name, response=response,
                                                             headers=headers, req_attributes={})
        except Exception as exc:  # KServe's handlers map its errors to statuses, as for its own endpoint
            if client_gone.done():
                return CLIENT_GONE
            answer = await exception_handler(self.app, exc)(None, exc)
            await answer(scope, receive, send)
            return None
        finally:
            client_gone.cancel()
        if isinstance(encoded, bytes):
            content, content_type = encoded, b"application/octet-stream"
        else:
            content, content_type = orjson.dumps(encoded), b"application/json"
        extra = {**response_headers, **encoded_headers}
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(content)).encode()),
            *((key.lower().encode("latin-1"), str(value).encode("latin-1")) for key, value in extra.items()
              if key.lower() not in ("content-type", "content-length"))]})
        await send({"type": "http.response.body", "body": content})
        return None


def install_routes(app: Any, dataplane: Any, models: dict[str, ExportModel]) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    async def metadata(model_name: str) -> JSONResponse:
        found = await dataplane.model_metadata(model_name)  # raises ModelNotFound: 404
        model = models[model_name]
        return JSONResponse({**found, "platform": "onnxruntime_onnx" if isinstance(model, TensorModel) else "",
                             "parameters": model.parameters})

    async def invalid(_: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": invalid_request_message(exc.errors())}, status_code=400)

    async def http_error(_: Any, exc: HTTPException) -> Response:
        # The protocol's error body, where FastAPI's would be {"detail": ...} (405, 404 on /v2/).
        if exc.status_code < 400:
            return Response(status_code=exc.status_code, headers=exc.headers)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    async def all_workers_metrics(request: Request) -> Response:
        from prometheus_client import CollectorRegistry, exposition, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        encoder, content_type = exposition.choose_encoder(request.headers.get("accept"))
        return Response(encoder(registry), headers={"content-type": content_type})

    # A path with a trailing slash is a 404, not Starlette's 307 to a URL built from the
    # client's Host header (an open redirect where a proxy passes Host through).
    app.router.redirect_slashes = False
    # Before KServe's own routes are added, so these answer first.
    app.add_api_route("/v2/models/{model_name}", metadata, methods=["GET"])
    if METRICS_DIR_ENV in os.environ:  # --workers: each scrape sums the counts of every worker
        app.add_api_route("/metrics", all_workers_metrics, methods=["GET"])
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
