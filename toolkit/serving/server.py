"""`toolkit serve`: an export on KServe's model server, speaking the Open Inference Protocol v2.

KServe provides the protocol (routes, request parsing, the binary tensor extension, health and
metadata, graceful shutdown); this module loads the export, and puts a guard in front of it
for what KServe 0.21 leaves open: it binds every interface, answers some malformed requests
with a 500 and a closed connection, takes bodies of any size, and counts no requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
from grpc_interceptor import AsyncServerInterceptor
from starlette.requests import Request  # at module level: FastAPI resolves handlers' annotations here
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from toolkit.core.contract import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS, image_model_name
from toolkit.core.errors import ToolkitError
from toolkit.runtime.predictor import ReloadingPredictor
from toolkit.serving.batching import DynamicBatcher
from toolkit.serving.eventloop import event_loop_runner
from toolkit.serving.oip import (
    BinaryKeepingDataPlane,
    ExportModel,
    ImageModel,
    NotOffered,
    ReadOnlyRepositoryExtension,
    TensorModel,
)
from toolkit.serving.workers import FAILED, METRICS_DIR_ENV, READY, run_workers, shared_metrics_dir

log = logging.getLogger("toolkit.serve")

MAX_BODY = 64 * 1024 * 1024  # 4096 images as JSON numbers fit; anything bigger is refused unread
GRACE_SECONDS = 30  # SIGTERM: requests in flight get this long to finish

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")
_BINARY_HEADER = b"inference-header-content-length"
_SERVED_PATHS = ("/v2/", "/metrics")
BODY_TIMEOUT_S = 20  # longest a body may take to arrive: a stalled client holds a slot for nothing
MAX_HEADER_BYTES = 64 * 1024  # a request's line and headers; nginx's default is 32 KB, uvicorn's h11 16 KB
HEADER_TIMEOUT_S = 10  # longest a request's line and headers may take to arrive (and a new connection's first byte)
INLINE_JSON_BYTES = 256 * 1024  # JSON bodies up to this are parsed on the event loop (well under 10 ms)
JSON_SLACK_VALUES = 10_000  # JSON values a request may hold beyond its tensor's: ids, parameters, outputs
# Linux spreads new connections over the sockets sharing a port with SO_REUSEPORT (other
# systems give them all to one), so each worker listens on its own. On one shared socket, the
# worker that wakes first accepts every connection waiting: 16 clients connecting at once all
# went to one worker.
SPREAD_BY_KERNEL = sys.platform.startswith("linux")
BACKLOG = 2048  # connections waiting to be accepted, as uvicorn's default
CLIENT_GONE = 499  # nginx's status for a client that closed before its answer
MAX_WORKERS = 64


@dataclass
class ServeOptions:
    """How `toolkit serve` runs an export (the CLI's options, with the same defaults)."""

    name: str | None = None  # default: the export folder's serving name
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = None
    provider: str = "auto"
    threads: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_delay_ms: float = DEFAULT_MAX_DELAY_MS
    check_integrity: bool = True
    max_body_bytes: int = MAX_BODY
    workers: int = 1
    log_requests: bool = False

    def validate(self) -> None:
        if not 1 <= self.max_batch_size <= 4096:
            raise ToolkitError(f"must be between 1 and 4096, got {self.max_batch_size}", option="max_batch_size")
        if not (math.isfinite(self.max_batch_delay_ms) and 0 <= self.max_batch_delay_ms <= 1000):
            raise ToolkitError(f"must be between 0 and 1000 ms, got {self.max_batch_delay_ms}",
                               option="max_batch_delay_ms")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.name):
            raise ToolkitError(f"must be letters, digits, '_', '.' or '-' (a URL path segment), got {self.name!r}",
                               option="name")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ToolkitError(f"must be between 1 and {MAX_WORKERS}, got {self.workers}", option="workers")
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ToolkitError(f"must differ from the HTTP port {self.port}", option="grpc_port")


def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "in_flight": Gauge("toolkit_requests_in_flight", "Inference requests received and not yet answered",
                           ["model", "protocol"], multiprocess_mode="livesum"),
        "requests": Counter("toolkit_requests", "Inference requests by model, protocol (rest, grpc) and status "
                            "(an HTTP status, or a gRPC status code's name)", ["model", "protocol", "status"]),
        "latency": Histogram("toolkit_request_seconds", "Inference request latency, received to answered",
                             ["model", "protocol"],
                             buckets=(.001, .002, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 5)),
        "batch_images": Histogram("toolkit_batch_images", "Images per model run (dynamic batching)",
                                  buckets=tuple(2.0 ** k for k in range(13))),
        "batch_requests": Histogram("toolkit_batch_requests", "Requests merged into one model run",
                                    buckets=tuple(2.0 ** k for k in range(9))),
    }


METRICS = _metrics()


@functools.cache
def _series(metric: str, *labels: str) -> Any:
    """One labelled series of a metric; looking one up by its labels costs more than counting."""
    return METRICS[metric].labels(*labels)


class _Tally:
    """One inference request of `model`: in flight from now until `finish`, which counts it by
    status and times it."""

    def __init__(self, model: str, protocol: str) -> None:
        self.model, self.protocol, self.started = model, protocol, time.perf_counter()
        _series("in_flight", model, protocol).inc()

    def finish(self, status: str) -> None:
        seconds = time.perf_counter() - self.started
        _series("in_flight", self.model, self.protocol).dec()
        _series("requests", self.model, self.protocol, status).inc()
        _series("latency", self.model, self.protocol).observe(seconds)
        log.debug("%s %s %s %.1f ms", self.protocol, self.model, status, 1000 * seconds)


@contextlib.contextmanager
def _counted(model: str, protocol: str) -> Any:
    """A `_Tally` of the block, by the status the block sets on the yielded dict (500 if none)."""
    outcome = {"status": "500"}
    tally = _Tally(model, protocol)
    try:
        yield outcome
    finally:
        tally.finish(outcome["status"])


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (408, 413):  # the body was left unread: the connection's next bytes are not a request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def invalid_request_message(errors: Sequence[Any]) -> str:
    """One line for pydantic's validation errors of an inference request: the first, and where."""
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"invalid inference request: {first.get('msg', 'unreadable')}" + (f" at {where}" if where else "")


def binary_request_problem(header_length: bytes, body: bytes, model: ExportModel | None = None) -> str | None:
    """What is wrong with a request in the binary tensor extension's framing, or None: the JSON
    header's length, the header itself, the inputs as `model` declares them, and each input's
    `binary_data_size` against its shape; the data's elements only once all of that holds."""
    from kserve.protocol.rest.v2_datamodels import (
        InferenceRequest,  # kserve only after toolkit.serving.oip's argv guard
    )
    from kserve.utils.numpy_codec import to_np_dtype
    from pydantic import ValidationError

    try:
        length = int(header_length)
    except ValueError:
        return f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}"
    if not 0 < length <= len(body):
        return f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes"
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError):
        return "the request's JSON header is not valid JSON"
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        return "the request's JSON header has no list of inputs"
    # The same model the JSON path is validated with (ids, parameters, outputs, names, shapes),
    # with the binary inputs' data standing in as empty.
    try:
        request = InferenceRequest.model_validate({**header, "inputs": [{"data": [], **tensor} for tensor in inputs]})
    except ValidationError as exc:
        return invalid_request_message(exc.errors())
    problem = output_flags_problem(request) or (model and model.declared_problem(
        [(tensor.get("name"), tensor.get("datatype"), tensor.get("shape")) for tensor in inputs]))
    if problem:
        return problem
    offset = length
    for tensor in inputs:
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            return f"input {name!r}: parameters must be an object"
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            return f"input {name!r} has no valid shape"
        dtype = to_np_dtype(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            return f"input {name!r} has no valid datatype, got {str(datatype)[:40]!r}"
        size = parameters.get("binary_data_size")
        if size is None:
            continue
        if type(size) is not int or size < 0:
            return f"input {name!r} has an invalid binary_data_size"
        if "data" in tensor:  # which one would be read? gRPC refuses contents beside raw contents too
            return f"input {name!r} has both data and binary_data_size; send one"
        problem = raw_tensor_problem(name, datatype, shape, body[offset:offset + size])
        if problem:
            return problem
        offset += size
    if offset != len(body):
        return f"the inputs' binary_data_size add up to {offset - length} bytes, the body holds {len(body) - length}"
    return None


def raw_tensor_problem(name: Any, datatype: str, shape: list[int], data: bytes) -> str | None:
    """What is wrong with one input's raw bytes (the binary extension's, or gRPC's
    `raw_input_contents`) for its datatype and shape, or None."""
    from kserve.utils.numpy_codec import to_np_dtype

    dtype = to_np_dtype(datatype)
    if dtype is None:
        return f"input {name!r} has no valid datatype, got {str(datatype)[:40]!r}"
    if datatype == "BYTES":
        if _utf8_elements(data, math.prod(shape)) != math.prod(shape):
            # KServe decodes BYTES elements as text; files go base64-encoded, as in JSON.
            return (f"input {name!r}: BYTES data must hold {math.prod(shape)} whole UTF-8 elements "
                    "(send image files base64-encoded)")
    elif len(data) != math.prod(shape) * np.dtype(dtype).itemsize:
        return f"input {name!r}: {len(data)} bytes of data do not fit {datatype} shape {shape}"
    return None


def output_flags_problem(request: Any) -> str | None:
    """What is wrong with an inference request's choice of binary outputs, or None: the
    protocol's flags are booleans, and KServe would read any value as one."""
    if not isinstance((request.parameters or {}).get("binary_data_output", False), bool):
        return "parameters.binary_data_output must be true or false"
    for output in request.outputs or ():
        if not isinstance((output.parameters or {}).get("binary_data", False), bool):
            return f"output {output.name!r}: parameters.binary_data must be true or false"
    return None


def _utf8_elements(data: bytes, most: int) -> int:
    """How many elements a serialized BYTES tensor (each a 4-byte little-endian length, then
    that many bytes) holds; -1 unless it is whole, every element is UTF-8 and there are at most
    `most` (the shape's count: more is wrong, and is not read through)."""
    offset, count = 0, 0
    while offset < len(data):
        if offset + 4 > len(data) or count == most:
            return -1
        size = int.from_bytes(data[offset:offset + 4], "little")
        element = data[offset + 4:offset + 4 + size]
        if len(element) != size:
            return -1
        try:
            element.decode("utf-8")
        except UnicodeDecodeError:
            return -1
        offset, count = offset + 4 + size, count + 1
    return count


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
    counted and timed by model and status (`_counted`), and logged at debug level.

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
        with _counted(model, "rest") as outcome:
            outcome["status"] = str(await self._answered(scope, receive, send))

    async def _answered(self, scope: Scope, receive: Receive, send: Send) -> int:
        """The request answered (or a 500 if something unexpected broke); its status."""
        status = 500

        async def tracked(message: MutableMapping[str, Any]) -> None:
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
            await _answer(send, 404, f"not found: {scope['path'][:100]}; this server speaks the v2 protocol")
            return None
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return None
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _answer(send, 413, f"the request body exceeds {self.limit} bytes")
            return None
        try:
            body = await asyncio.wait_for(self._body(receive), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            await _answer(send, 408, f"the request body did not arrive within {BODY_TIMEOUT_S} s")
            return None
        if body is None:
            return CLIENT_GONE
        if len(body) > self.limit:
            await _answer(send, 413, f"the request body exceeds {self.limit} bytes")
            return None
        infer = _INFER_PATH.match(scope["path"])
        if infer and infer.group(1) not in self.models:  # before the body's checks, as for GET
            await _answer(send, 404, f"Model with name {infer.group(1)[:100]} does not exist; this server serves "
                          f"{', '.join(sorted(self.models))}")
            return None
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
        delivered = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
        return None

    async def _body(self, receive: Receive) -> bytes | None:
        """The request body, read until it ends or passes the limit; None if the client left."""
        chunks, size = [], 0
        while size <= self.limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body"):
                break
        return b"".join(chunks)

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
            answer = await _exception_handler(self.app, exc)(None, exc)
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


def json_request(body: bytes, model: ExportModel) -> Any:
    """An infer request's JSON body as KServe's request model, checked as `model` declares its
    input before any element is converted; the body's values are counted (by their commas,
    at C speed) before it is parsed at all: more than the model takes are refused unparsed."""
    from kserve.errors import InvalidInput
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from pydantic import ValidationError

    most = model.max_values + JSON_SLACK_VALUES
    if body.count(b",") >= most:
        raise InvalidInput(f"the request holds over {most:,} JSON values (counted by their commas); {model.name} "
                           f"takes at most {model.max_values:,} a request")
    try:
        request = InferenceRequest.model_validate_json(body, strict=True)  # strict: no `true` for 1
    except ValidationError as exc:
        raise InvalidInput(invalid_request_message(exc.errors())) from None
    problem = output_flags_problem(request) or model.declared_problem(
        [(tensor.name, tensor.datatype, tensor.shape) for tensor in request.inputs])
    for tensor in request.inputs:
        if not problem and "binary_data_size" in (tensor.parameters or {}):  # KServe would read `data`
            problem = f"input {tensor.name!r} has binary_data_size but the request is not in the binary extension"
    if problem:
        raise InvalidInput(problem)
    return request


def _exception_handler(app: Any, exc: Exception) -> Callable[[Any, Exception], Awaitable[Any]]:
    """The app's handler for `exc`, looked up by its class hierarchy as Starlette does."""
    for cls in type(exc).__mro__:
        if cls in app.exception_handlers:
            return app.exception_handlers[cls]
    raise exc


class _ExpectedTracebacks(logging.Filter):
    """Drops the tracebacks of what is not a server error: KServe logs every 400, 404 and 501
    (a client's mistake, or a call this server does not offer) at ERROR, and uvicorn every
    request still open when shutdown cancels it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kserve.errors import InvalidInput, ModelNotFound

        expected = InvalidInput | ModelNotFound | NotImplementedError | asyncio.CancelledError
        return not (record.exc_info and isinstance(record.exc_info[1], expected))


def _drop_timing_middleware(app: Any) -> None:
    """KServe's TimingMiddleware reads the process's CPU time around every request only to log
    it at trace level: 13% of the server's time at 16 clients. Removed before the app builds
    its middleware stack (on its first request)."""
    from timing_asgi import TimingMiddleware

    app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]


def build_models(export_dir: str | Path, options: ServeOptions) -> tuple[TensorModel, ImageModel, DynamicBatcher]:
    """The tensor and image models of one export, sharing a Predictor (reloaded when the export
    at the path is replaced) and a batcher."""
    options.validate()
    live = ReloadingPredictor(export_dir, provider=options.provider, threads=options.threads,
                              check_integrity=options.check_integrity)
    name = options.name or live.current.export.served_name  # the export dir, or a bare .onnx's folder

    def counted(images: int, requests: int) -> None:
        METRICS["batch_images"].observe(images)
        METRICS["batch_requests"].observe(requests)

    batcher = DynamicBatcher(lambda images: live.current.run(images), max_batch_size=options.max_batch_size,
                             max_delay_s=options.max_batch_delay_ms / 1000, on_batch=counted)
    return TensorModel(name, live, batcher), ImageModel(image_model_name(name), live, batcher), batcher


def _listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound and listening before the server starts: a taken port is one clear error,
    no other server can bind the port while the model loads (a bound socket that does not
    listen yet would let one), and connections that come meanwhile wait in its queue. TCP
    named as the protocol: asyncio sets TCP_NODELAY only then (without it a reply waits ~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ToolkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _install_routes(app: Any, dataplane: Any, models: dict[str, ExportModel]) -> None:
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


def serve(export_dir: str | Path, options: ServeOptions,
          on_ready: Callable[[str, list[str]], None] | None = None) -> None:
    """Serve `export_dir` until SIGTERM or Ctrl-C, which let requests in flight finish; with
    `options.workers` above 1, from that many processes sharing the port (`toolkit.serving.workers`)."""
    options.validate()
    configure_logging(options.log_requests)
    sockets = [_listening_socket(options.host, options.port)]
    try:
        if options.grpc_port is not None:
            _listening_socket(options.host, options.grpc_port).close()  # free now; grpc binds by address
        host = f"[{options.host}]" if ":" in options.host else options.host
        port = sockets[0].getsockname()[1]  # the one asked for, or the one found for port 0
        url = f"http://{host}:{port}"
        if options.workers == 1:
            _serve_on(sockets[0], export_dir, options, on_ready=lambda models: on_ready and on_ready(url, models))
            return
        if SPREAD_BY_KERNEL:  # the port is free (checked above): a socket of its own for each worker
            sockets.pop().close()
            sockets.extend(_listening_socket(options.host, port, reuse_port=True) for _ in range(options.workers))
        # Checked here once, so a bad export is one message rather than one per worker.
        name = options.name or ReloadingPredictor(
            export_dir, provider=options.provider, threads=options.threads,
            check_integrity=options.check_integrity).current.export.served_name
        with shared_metrics_dir():
            run_workers(functools.partial(_serve_worker, export_dir, options),
                        sockets if SPREAD_BY_KERNEL else sockets * options.workers,
                        on_ready=lambda: on_ready and on_ready(url, [name, image_model_name(name)]),
                        grace_seconds=GRACE_SECONDS)
    finally:
        for sock in sockets:
            sock.close()


def configure_logging(log_requests: bool) -> None:
    """Warnings and errors with their time; `toolkit.serve`'s request lines with `log_requests`."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.DEBUG if log_requests else logging.INFO)


def _serve_worker(export_dir: str | Path, options: ServeOptions, index: int, sock: socket.socket,
                  report: Callable[..., None]) -> None:
    """One of `--workers` processes (`toolkit.serving.workers`): the export served on the socket the
    parent made for it."""
    configure_logging(options.log_requests)
    try:
        _serve_on(sock, export_dir, options, on_ready=lambda _: report(READY))
    except ToolkitError as exc:
        report(FAILED, f"worker {index}: {exc.for_command_line()}")


def _serve_on(sock: socket.socket, export_dir: str | Path, options: ServeOptions,
              on_ready: Callable[[list[str]], None]) -> None:
    """The export served on a bound socket (and gRPC, if asked) until SIGTERM or Ctrl-C."""
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_repository import ModelRepository
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer

    tensor_model, image_model, batcher = build_models(export_dir, options)
    repository = ModelRepository()
    for model in (tensor_model, image_model):
        repository.update(model)
    dataplane = BinaryKeepingDataPlane(model_registry=repository)
    extension = ReadOnlyRepositoryExtension(model_registry=repository)
    for logger in ("kserve", "uvicorn.error"):
        logging.getLogger(logger).addFilter(_ExpectedTracebacks())
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, dataplane, extension, options.port, grace_period=GRACE_SECONDS)
    rest.config.host, rest.config.access_log = options.host, False  # KServe binds 0.0.0.0 otherwise
    rest.config.http = HeaderGuard
    models = {m.name: m for m in (tensor_model, image_model)}
    _install_routes(app, dataplane, models)
    rest.create_application()
    _drop_timing_middleware(app)
    # Outermost, in front of FastAPI's own middleware, which infer requests do not need.
    rest.config.app = ProtocolGuard(app, dataplane, limit=options.max_body_bytes, models=models)

    async def run() -> None:
        rest_server = asyncio.create_task(rest._server.serve(sockets=[sock]))
        grpc_stopped = None
        if options.grpc_port is not None:
            grpc_server = await _start_grpc(dataplane, extension, options.host, options.grpc_port, models)
            grpc_stopped = asyncio.create_task(_stop_with(rest._server, grpc_server))
        while not rest._server.started and not rest_server.done():
            await asyncio.sleep(0.02)
        if rest._server.started:
            on_ready([tensor_model.name, image_model.name])
        try:
            await rest_server
        finally:
            if grpc_stopped is not None:
                rest._server.should_exit = True  # also when REST ended by failing
                await grpc_stopped
            batcher.close()

    # uvicorn handles SIGTERM and Ctrl-C itself (stop accepting, finish requests in flight),
    # then raises the signal again once it is done; ignoring that second one exits with 0.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")  # KServe 0.21 still uses it
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        event_loop_runner()(run())
    except SystemExit as exc:  # uvicorn exits on a failed start-up
        raise ToolkitError(f"the server stopped while starting (exit {exc.code})") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class GrpcCounter(AsyncServerInterceptor):
    """Counts gRPC ModelInfer calls as ProtocolGuard counts REST ones, by gRPC status name."""

    def __init__(self, models: frozenset[str]) -> None:
        self.models = models

    async def intercept(self, method: Callable[..., Any], request: Any, context: Any, method_name: str) -> Any:
        if not method_name.endswith("/ModelInfer"):
            return await method(request, context)
        tally = _Tally(request.model_name if request.model_name in self.models else "unknown", "grpc")
        handler = {"state": "running"}
        # Counted once the call has ended, answered or not: a client that gave up (or whose
        # deadline passed) while its request waited ends the call before the handler returns.
        context.add_done_callback(lambda ended: tally.finish(_grpc_status(ended, handler["state"])))
        try:
            response = await method(request, context)
        except asyncio.CancelledError:  # the call ended (deadline, or the client cancelled) first
            raise
        except BaseException:
            handler["state"] = "raised"
            raise
        handler["state"] = "answered"
        return response


def _grpc_status(context: Any, handler: str) -> str:
    """How a gRPC call ended, as a status code's name; `handler`: whether its handler had
    answered, raised or was still running then."""
    code = context.code()
    if code is not None:
        return code.name
    if handler == "running":  # the call ended without its answer
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED).name
    return "OK" if handler == "answered" else grpc.StatusCode.UNKNOWN.name


class Undecodable:
    """A ModelInfer call whose bytes are not a ModelInferRequest: gRPC would answer UNKNOWN
    and log a traceback for the decoder's error; the servicer refuses it as INVALID_ARGUMENT."""

    model_name = model_version = ""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    from google.protobuf.message import DecodeError

    def tolerant(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as exc:
            return Undecodable(exc)

    return tolerant


class _TolerantModelInfer:
    """Stands for the gRPC server while KServe's generated code adds its service's handlers, and
    adds them with ModelInfer's request decoder made `_tolerant`."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, _: Any) -> None:
        """Made from the same handlers in `add_registered_method_handlers`, which comes next."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        infer = handlers["ModelInfer"]
        tolerant = infer._replace(request_deserializer=_tolerant(infer.request_deserializer))
        handlers = {**handlers, "ModelInfer": tolerant}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.server.add_registered_method_handlers(service, handlers)


def _contents_count(tensor: Any) -> int:
    """How many values a gRPC input's `contents` hold, whatever their type; counted, not read."""
    return sum(len(values) for _, values in tensor.contents.ListFields())


def _guarded_servicer(dataplane: Any, extension: Any, models: Mapping[str, ExportModel]) -> Any:
    """KServe's gRPC inference service, refusing what its REST side refuses: bytes that are not
    a request, a model version in any call (UNIMPLEMENTED, REST's 501), inputs the model does
    not declare, and contents or raw contents that do not fit their shapes (INVALID_ARGUMENT,
    where KServe would fail with UNKNOWN or INTERNAL); each checked by its cheapest facts
    first: the declared inputs, then the counts, and only then the elements."""
    from kserve.errors import InvalidInput
    from kserve.protocol.grpc.servicer import InferenceServicer

    def refuse_versions(version: str) -> None:
        if version:
            raise NotOffered("model versions are not served here; leave the version empty")

    class GuardedServicer(InferenceServicer):
        async def ModelInfer(self, request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                raise InvalidInput(f"the call's bytes are not a ModelInferRequest ({request.error})")
            refuse_versions(request.model_version)
            model = models.get(request.model_name)  # KServe answers a name not served
            problem = model and model.declared_problem([(t.name, t.datatype, list(t.shape)) for t in request.inputs])
            if problem:
                raise InvalidInput(problem)
            if not request.raw_input_contents:
                for tensor in request.inputs:
                    if _contents_count(tensor) != math.prod(tensor.shape):
                        raise InvalidInput(f"input {tensor.name!r}: {_contents_count(tensor)} values do not fill "
                                           f"shape {list(tensor.shape)}")
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=False):  # counts: KServe's check
                problem = raw_tensor_problem(tensor.name, tensor.datatype, list(tensor.shape), raw)
                if problem:
                    raise InvalidInput(problem)
            return await super().ModelInfer(request, context)

        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            refuse_versions(request.version)
            return await super().ModelMetadata(request, context)

        async def ModelReady(self, request: Any, context: Any) -> Any:
            refuse_versions(request.version)
            return await super().ModelReady(request, context)

    return GuardedServicer(dataplane, extension)


async def _stop_with(rest_server: Any, grpc_server: Any) -> None:
    """Stop gRPC when REST begins to (SIGTERM, Ctrl-C or a failed start): both stop taking new
    calls at once, and let the calls in flight finish."""
    while not rest_server.should_exit:
        await asyncio.sleep(0.1)
    await grpc_server.stop(grace=GRACE_SECONDS)


async def _start_grpc(dataplane: Any, extension: Any, host: str, port: int, models: Mapping[str, ExportModel]) -> Any:
    """KServe's gRPC inference service on `host:port` (KServe's own gRPC server binds every
    interface, so its servicer is mounted on a server bound here)."""
    from concurrent import futures

    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor

    interceptors = (GrpcCounter(frozenset(models)), LoggingInterceptor(), ExceptionToStatusInterceptor())
    server = aio.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors,
                        options=[("grpc.max_receive_message_length", MAX_BODY),
                                 ("grpc.max_send_message_length", MAX_BODY)])
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        _guarded_servicer(dataplane, extension, models), _TolerantModelInfer(server))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise ToolkitError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server
