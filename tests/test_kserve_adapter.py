"""What `toolkit.serving.kserve_adapter` relies on in KServe beyond its public API, pinned: a
KServe upgrade that moves any of it fails here, by name, rather than somewhere in the server.

Each check runs in a fresh interpreter: KServe's gRPC protos and tritonclient's (which other
test modules import) cannot be loaded in one."""

import subprocess
import sys
import textwrap


def _run(check):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(check)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_kserve_is_imported_without_reading_the_toolkits_options():
    _run("""
    import sys
    sys.argv = ["toolkit", "serve", "--workers", "not-a-number"]  # kserve's own --workers takes an int
    from toolkit.serving import kserve_adapter
    assert sys.argv == ["toolkit", "serve", "--workers", "not-a-number"]
    assert kserve_adapter.kserve.model_server.args.workers == 1
    """)


def test_the_rest_server_is_kserves_app_on_a_uvicorn_server_run_here():
    _run("""
    import asyncio, socket
    from unittest import mock

    import httpx, uvicorn
    from fastapi.responses import JSONResponse
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.errors import InvalidInput, ModelNotFound, invalid_input_handler, model_not_found_handler
    from kserve.model_repository import ModelRepository
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from timing_asgi import TimingMiddleware
    from uvicorn.importer import import_from_string

    from toolkit.serving import kserve_adapter

    repository = ModelRepository()
    dataplane = kserve_adapter.BinaryKeepingDataPlane(model_registry=repository)
    seen = {}

    def install_routes(app):
        seen["app"] = app
        app.add_api_route("/v2/models/{model_name}", lambda model_name: JSONResponse({"ours": model_name}))

    def guard(app):
        seen["guarded"] = app
        return app

    drop = kserve_adapter._drop_timing_middleware

    def recorded_drop(app):
        seen["middleware"] = [m.cls for m in app.user_middleware]
        drop(app)

    with mock.patch.object(kserve_adapter, "_drop_timing_middleware", recorded_drop):
        server = kserve_adapter.rest_server(dataplane, ModelRepositoryExtension(model_registry=repository),
                                            host="127.0.0.1", port=0, grace_seconds=3,
                                            http=uvicorn.config.HTTP_PROTOCOLS["httptools"],
                                            install_routes=install_routes, guard=guard)
    app = seen["app"]
    # The module-level app is the one create_application() fills, and the one guarded.
    assert app is import_from_string(FASTAPI_APP_IMPORT_STRING) is seen["guarded"]
    # KServe adds TimingMiddleware to user_middleware; the adapter takes it out again.
    assert TimingMiddleware in seen["middleware"]
    assert TimingMiddleware not in [m.cls for m in app.user_middleware]
    # KServe's handlers answer its errors, found on the app by the error's class.
    assert kserve_adapter.exception_handler(app, InvalidInput("x")) is invalid_input_handler
    assert kserve_adapter.exception_handler(app, ModelNotFound("x")) is model_not_found_handler
    # RESTServer.config is the uvicorn config, run on a server of the adapter's own.
    assert isinstance(server, uvicorn.Server) and isinstance(server.config, uvicorn.Config)
    assert server.config.host == "127.0.0.1" and server.config.timeout_graceful_shutdown == 3
    assert server.config.app is app and not server.config.access_log

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def serve_once():
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        for _ in range(500):  # started: what the server waits on before it says it is ready
            if server.started:
                break
            await asyncio.sleep(0.02)
        assert server.started
        async with httpx.AsyncClient(timeout=10) as client:
            # KServe's own routes landed on that app.
            assert (await client.get(f"http://127.0.0.1:{port}/v2/health/live")).status_code == 200
            # A route installed before create_application() answers before KServe's own.
            assert (await client.get(f"http://127.0.0.1:{port}/v2/models/m")).json() == {"ours": "m"}
        server.should_exit = True  # how the server stops it, and what stops gRPC with it
        await asyncio.wait_for(serving, 30)

    asyncio.run(serve_once())
    """)


def test_binary_tensors_reach_the_model_as_the_arrays_sent():
    _run("""
    import json
    import numpy as np
    from kserve.model_repository import ModelRepository

    from toolkit.serving.kserve_adapter import BinaryKeepingDataPlane

    values = np.arange(6, dtype=np.float32)
    header = json.dumps({"inputs": [{"name": "image", "shape": [2, 3], "datatype": "FP32",
                                     "parameters": {"binary_data_size": values.nbytes}}]}).encode()
    dataplane = BinaryKeepingDataPlane(model_registry=ModelRepository())
    # DataPlane.decode hands a v2 body to decode_inference_request, which the adapter overrides.
    request, _ = dataplane.decode(header + values.tobytes(), {"inference-header-content-length": str(len(header))},
                                  protocol_version="v2", model_name="m")
    assert isinstance(request.inputs[0].data, np.ndarray)
    np.testing.assert_array_equal(request.inputs[0].as_numpy(), values.reshape(2, 3))
    """)


def test_grpc_bytes_that_do_not_decode_reach_the_servicer():
    _run("""
    from kserve.model_repository import ModelRepository
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension

    from toolkit.serving.kserve_adapter import BinaryKeepingDataPlane, Undecodable, add_inference_service

    class Recorder:  # KServe's generated code adds its handlers in these two calls
        def __init__(self):
            self.generic, self.registered = [], {}

        def add_generic_rpc_handlers(self, handlers):
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service, handlers):
            self.registered[service] = handlers

    repository = ModelRepository()
    server = Recorder()
    add_inference_service(server, InferenceServicer(BinaryKeepingDataPlane(model_registry=repository),
                                                    ModelRepositoryExtension(model_registry=repository)))
    assert len(server.generic) == 1 and list(server.registered) == ["inference.GRPCInferenceService"]
    handlers = server.registered["inference.GRPCInferenceService"]
    assert all(isinstance(handler.request_deserializer(b"\\xff\\xff\\xff"), Undecodable)
               for handler in handlers.values())
    decode = handlers["ModelInfer"].request_deserializer
    assert decode(pb.ModelInferRequest(model_name="m").SerializeToString()).model_name == "m"
    """)
