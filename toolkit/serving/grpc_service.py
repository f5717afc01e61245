"""The gRPC side of the server: KServe's inference service, refusing what the REST side refuses,
with its ModelInfer calls counted as the REST ones are."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from grpc_interceptor import AsyncServerInterceptor

from toolkit.core.errors import ToolkitError
from toolkit.serving.kserve_adapter import Undecodable, add_inference_service
from toolkit.serving.metrics import Tally
from toolkit.serving.oip import ExportModel, NotOffered, quoted
from toolkit.serving.options import GRACE_SECONDS, MAX_BODY, QUOTED_CHARS
from toolkit.serving.validation import counts_problem, raw_tensor_problem


class GrpcCounter(AsyncServerInterceptor):
    """Counts gRPC ModelInfer calls as ProtocolGuard counts REST ones, by gRPC status name."""

    def __init__(self, models: frozenset[str]) -> None:
        self.models = models

    async def intercept(self, method: Callable[..., Any], request: Any, context: Any, method_name: str) -> Any:
        if not method_name.endswith("/ModelInfer"):
            return await method(request, context)
        tally = Tally(request.model_name if request.model_name in self.models else "unknown", "grpc")
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


class RefuseUndecodable(AsyncServerInterceptor):
    """Refuses a call whose bytes are not its method's request as INVALID_ARGUMENT, whatever
    the method (gRPC answered UNKNOWN with a traceback logged)."""

    async def intercept(self, method: Callable[..., Any], request: Any, context: Any, method_name: str) -> Any:
        from kserve.errors import InvalidInput

        if isinstance(request, Undecodable):
            raise InvalidInput(f"the call's bytes are not a {method_name.rsplit('/', 1)[-1][:40]}Request "
                               f"({request.error})")
        return await method(request, context)


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


def _contents_count(tensor: Any) -> int:
    """How many values a gRPC input's `contents` hold, whatever their type; counted, not read."""
    return sum(len(values) for _, values in tensor.contents.ListFields())


def _guarded_servicer(dataplane: Any, extension: Any, models: Mapping[str, ExportModel]) -> Any:
    """KServe's gRPC inference service, refusing what its REST side refuses: bytes that are not
    a request, a model version in any call (UNIMPLEMENTED, REST's 501), inputs the model does
    not declare, and contents or raw contents that do not fit their shapes (INVALID_ARGUMENT,
    where KServe would fail with UNKNOWN or INTERNAL); each checked by its cheapest facts
    first: the declared inputs, then the counts, and only then the elements."""
    from kserve.errors import InvalidInput, ModelNotFound
    from kserve.protocol.grpc.servicer import InferenceServicer

    def refuse_unserved(name: str, version: str) -> None:
        if version:
            raise NotOffered("model versions are not served here; leave the version empty")
        if name not in models:  # KServe's error would quote the name whole: a 1 MB name overflowed the trailer
            raise ModelNotFound(name[:QUOTED_CHARS])

    class GuardedServicer(InferenceServicer):
        async def ModelInfer(self, request: Any, context: Any) -> Any:
            refuse_unserved(request.model_name, request.model_version)
            model = models[request.model_name]
            problem = counts_problem(len(request.inputs), len(request.outputs), model) or model.declared_problem(
                [(t.name, t.datatype, list(t.shape)) for t in request.inputs])
            if problem:
                raise InvalidInput(problem)
            if not request.raw_input_contents:
                for tensor in request.inputs:
                    if _contents_count(tensor) != math.prod(tensor.shape):
                        raise InvalidInput(f"input {quoted(tensor.name)}: {_contents_count(tensor)} values do not fill "
                                           f"shape {list(tensor.shape)}")
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=False):  # counts: KServe's check
                problem = raw_tensor_problem(tensor.name, tensor.datatype, list(tensor.shape), raw)
                if problem:
                    raise InvalidInput(problem)
            return await super().ModelInfer(request, context)

        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            refuse_unserved(request.name, request.version)
            return await super().ModelMetadata(request, context)

        async def ModelReady(self, request: Any, context: Any) -> Any:
            refuse_unserved(request.name, request.version)
            return await super().ModelReady(request, context)

    return GuardedServicer(dataplane, extension)


async def start_grpc(dataplane: Any, extension: Any, host: str, port: int, models: Mapping[str, ExportModel]) -> Any:
    """KServe's gRPC inference service on `host:port` (KServe's own gRPC server binds every
    interface, so its servicer is mounted on a server bound here)."""
    from concurrent import futures

    from grpc import aio
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor

    interceptors = (GrpcCounter(frozenset(models)), LoggingInterceptor(), ExceptionToStatusInterceptor(),
                    RefuseUndecodable())
    server = aio.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors,
                        options=[("grpc.max_receive_message_length", MAX_BODY),
                                 ("grpc.max_send_message_length", MAX_BODY)])
    add_inference_service(server, _guarded_servicer(dataplane, extension, models))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise ToolkitError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server


async def stop_with(rest_server: Any, grpc_server: Any) -> None:
    """Stop gRPC when REST begins to (SIGTERM, Ctrl-C or a failed start): both stop taking new
    calls at once, and let the calls in flight finish."""
    while not rest_server.should_exit:
        await asyncio.sleep(0.1)
    await grpc_server.stop(grace=GRACE_SECONDS)
