"""KServe's parts the server relies on beyond KServe's public API: the one module that touches
them, so that a KServe upgrade that moves one fails here and in `tests/test_kserve_adapter.py`,
nowhere else (pyproject.toml caps kserve below its next minor for them). Each, and why:

- importing kserve parses `sys.argv` (`kserve.model_server`'s module-level argparse) and reads
  its log level from the environment: `import_kserve` hides the toolkit's own options from it;
- `kserve.model_server.app`, the module-level FastAPI app (`FASTAPI_APP_IMPORT_STRING`):
  `RESTServer.create_application()` adds KServe's routes, handlers and middleware to it and
  returns nothing, so this server's routes and guard reach the app through that attribute;
- `app.user_middleware` holding KServe's `TimingMiddleware` until the first request builds the
  middleware stack: dropped, it read the CPU time around every request only to log it at trace
  level (13% of the server's time at 16 clients);
- `app.exception_handlers`, where KServe maps its errors to answers: the guard's direct infer
  path answers with the same handlers;
- `RESTServer.config`, the uvicorn config KServe builds (keep-alive, graceful shutdown): run
  on a `uvicorn.Server` of this module's, on a socket bound beforehand, where KServe's own
  (`RESTServer._server`) is private;
- `DataPlane.decode` calling `decode_inference_request` for a v2 body, which
  `BinaryKeepingDataPlane` overrides;
- KServe's generated gRPC code (`add_GRPCInferenceServiceServicer_to_server`) adding its
  handlers with `add_generic_rpc_handlers`, then `add_registered_method_handlers`:
  `add_inference_service` swaps every method's request decoder there.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from toolkit.core.errors import ToolkitError


def import_kserve() -> Any:
    """The kserve package, imported with the toolkit's options out of its sight."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    os.environ.setdefault("KSERVE_LOGLEVEL", "WARNING")
    try:
        import kserve
    except ImportError:
        raise ToolkitError("serving needs KServe: pip install 'toolkit[serve]'") from None
    finally:
        sys.argv = argv
    return kserve


kserve = import_kserve()
from kserve import InferRequest  # noqa: E402  (after the argv guard)
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER  # noqa: E402
from kserve.errors import InvalidInput  # noqa: E402
from kserve.protocol.dataplane import DataPlane  # noqa: E402
from kserve.protocol.infer_type import InferInput, RequestedOutput, deserialize_bytes_tensor  # noqa: E402
from kserve.utils.numpy_codec import to_np_dtype  # noqa: E402

ASGIApp = Callable[..., Awaitable[None]]


def rest_server(dataplane: Any, extension: Any, *, host: str, port: int, grace_seconds: int, http: type,
                install_routes: Callable[[Any], None], guard: Callable[[Any], ASGIApp]) -> Any:
    """KServe's REST server for `dataplane` as a `uvicorn.Server` bound to `host` (KServe binds
    0.0.0.0), speaking `http` (a uvicorn protocol class), without access log. `install_routes(app)`
    adds routes that answer before KServe's own; `guard(app)` is the ASGI app run in front."""
    import uvicorn
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer

    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, dataplane, extension, port, grace_period=grace_seconds)
    rest.config.host, rest.config.access_log, rest.config.http = host, False, http
    install_routes(app)
    rest.create_application()
    _drop_timing_middleware(app)
    rest.config.app = guard(app)
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")  # KServe 0.21 still uses it
    return uvicorn.Server(rest.config)


def _drop_timing_middleware(app: Any) -> None:
    """Removed before the app builds its middleware stack (on its first request)."""
    from timing_asgi import TimingMiddleware

    app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]


def exception_handler(app: Any, exc: Exception) -> Callable[[Any, Exception], Awaitable[Any]]:
    """The app's handler for `exc`, looked up by its class hierarchy as Starlette does."""
    for cls in type(exc).__mro__:
        if cls in app.exception_handlers:
            return app.exception_handlers[cls]
    raise exc


class BinaryKeepingDataPlane(DataPlane):
    """KServe's data plane, except that tensors sent in the binary extension stay numpy arrays:
    KServe 0.21 turns each into a Python list and back, a fifth of the server's time at 16
    clients. The server's guard has checked the framing (header length, sizes, BYTES elements)
    before this runs."""

    def decode_inference_request(self, body: Any, headers: dict[str, str], model_name: str) -> InferRequest:
        if not isinstance(body, bytes):
            return super().decode_inference_request(body, headers, model_name)
        length = int(headers[INFERENCE_CONTENT_LENGTH_HEADER])
        header = json.loads(body[:length])
        inputs, offset = [], length
        for tensor in header["inputs"]:
            parameters, datatype = tensor.get("parameters") or {}, tensor.get("datatype")
            size = parameters.get("binary_data_size")
            if size is None:
                data = tensor.get("data")
                if data is None:
                    raise InvalidInput(f"input {tensor.get('name')!r} has neither data nor binary_data_size")
            else:
                raw = body[offset:offset + size]
                offset += size
                data = (deserialize_bytes_tensor(raw) if datatype == "BYTES"
                        else np.frombuffer(raw, dtype=to_np_dtype(datatype)))
            inputs.append(InferInput(name=tensor.get("name"), shape=tensor["shape"], datatype=datatype,
                                     data=data, parameters=parameters))
        outputs = header.get("outputs")
        requested = None if outputs is None else [
            RequestedOutput(name=output["name"], parameters=output.get("parameters")) for output in outputs]
        return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=header.get("id"),
                            parameters=header.get("parameters"), request_outputs=requested)


class Undecodable:
    """A call whose bytes are not its method's request: gRPC would answer UNKNOWN and log a
    traceback for the decoder's error; the server refuses it as INVALID_ARGUMENT."""

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


class _TolerantDecoders:
    """Stands for the gRPC server while KServe's generated code adds its service's handlers, and
    adds them with every method's request decoder made `_tolerant`."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, _: Any) -> None:
        """Made from the same handlers in `add_registered_method_handlers`, which comes next."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        handlers = {name: handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
                    for name, handler in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.server.add_registered_method_handlers(service, handlers)


def add_inference_service(server: Any, servicer: Any) -> None:
    """KServe's gRPC inference service on `server`, served by `servicer`; a ModelInfer call whose
    bytes do not decode reaches the interceptors and servicer as an `Undecodable`."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _TolerantDecoders(server))
