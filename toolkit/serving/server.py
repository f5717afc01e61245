"""`toolkit serve`: an export on KServe's model server, speaking the Open Inference Protocol v2.

KServe provides the protocol (routes, request parsing, the binary tensor extension, health and
metadata, graceful shutdown); this module loads the export, assembles the server from its parts
(`rest`, `grpc_service`, KServe's through `kserve_adapter`) and runs it, in one process or in
`--workers` (`workers`). The guard in front of KServe covers what KServe 0.21 leaves open: it
binds every interface, answers some malformed requests with a 500 and a closed connection,
takes bodies of any size, and counts no requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from toolkit.core.contract import image_model_name
from toolkit.core.errors import ToolkitError
from toolkit.runtime.predictor import ReloadingPredictor
from toolkit.serving.batching import DynamicBatcher
from toolkit.serving.eventloop import event_loop_runner
from toolkit.serving.grpc_service import start_grpc, stop_with
from toolkit.serving.kserve_adapter import BinaryKeepingDataPlane, rest_server
from toolkit.serving.metrics import count_batch
from toolkit.serving.oip import ImageModel, ReadOnlyRepositoryExtension, TensorModel
from toolkit.serving.options import BACKLOG, GRACE_SECONDS, SPREAD_BY_KERNEL, ServeOptions
from toolkit.serving.rest import HeaderGuard, ProtocolGuard, install_routes
from toolkit.serving.workers import FAILED, READY, run_workers, shared_metrics_dir

log = logging.getLogger("toolkit.serve")


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
        name = options.served_name(export_dir)  # a missing export: one message, before any worker starts
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
        report(FAILED, exc.for_command_line())


def _serve_on(sock: socket.socket, export_dir: str | Path, options: ServeOptions,
              on_ready: Callable[[list[str]], None]) -> None:
    """The export served on a bound socket (and gRPC, if asked) until SIGTERM or Ctrl-C."""
    from kserve.model_repository import ModelRepository

    tensor_model, image_model, batcher = build_models(export_dir, options)
    repository = ModelRepository()
    for model in (tensor_model, image_model):
        repository.update(model)
    dataplane = BinaryKeepingDataPlane(model_registry=repository)
    extension = ReadOnlyRepositoryExtension(model_registry=repository)
    for logger in ("kserve", "uvicorn.error"):
        logging.getLogger(logger).addFilter(ExpectedTracebacks())
    models = {m.name: m for m in (tensor_model, image_model)}
    server = rest_server(
        dataplane, extension, host=options.host, port=options.port, grace_seconds=GRACE_SECONDS, http=HeaderGuard,
        install_routes=lambda app: install_routes(app, dataplane, models),
        # Outermost, in front of FastAPI's own middleware, which infer requests do not need.
        guard=lambda app: ProtocolGuard(app, dataplane, limit=options.max_body_bytes, models=models))

    async def run() -> None:
        rest_serving = asyncio.create_task(server.serve(sockets=[sock]))
        grpc_stopped = None
        if options.grpc_port is not None:
            grpc_server = await start_grpc(dataplane, extension, options.host, options.grpc_port, models)
            grpc_stopped = asyncio.create_task(stop_with(server, grpc_server))
        while not server.started and not rest_serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            on_ready([tensor_model.name, image_model.name])
        try:
            await rest_serving
        finally:
            if grpc_stopped is not None:
                server.should_exit = True  # also when REST ended by failing
                await grpc_stopped
            batcher.close()

    # uvicorn handles SIGTERM and Ctrl-C itself (stop accepting, finish requests in flight),
    # then raises the signal again once it is done; ignoring that second one exits with 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        event_loop_runner()(run())
    except SystemExit as exc:  # uvicorn exits on a failed start-up
        raise ToolkitError(f"the server stopped while starting (exit {exc.code})") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ExpectedTracebacks(logging.Filter):
    """Drops the tracebacks of what is not a server error: KServe logs every 400, 404 and 501
    (a client's mistake, or a call this server does not offer) at ERROR, and uvicorn every
    request still open when shutdown cancels it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kserve.errors import InvalidInput, ModelNotFound

        expected = InvalidInput | ModelNotFound | NotImplementedError | asyncio.CancelledError
        return not (record.exc_info and isinstance(record.exc_info[1], expected))


def build_models(export_dir: str | Path, options: ServeOptions) -> tuple[TensorModel, ImageModel, DynamicBatcher]:
    """The tensor and image models of one export, sharing a Predictor (reloaded when the export
    at the path is replaced) and a batcher."""
    options.validate()
    name = options.served_name(export_dir)
    live = ReloadingPredictor(export_dir, provider=options.provider, threads=options.threads,
                              check_integrity=options.check_integrity)

    batcher = DynamicBatcher(lambda images: live.current.run(images), max_batch_size=options.max_batch_size,
                             max_delay_s=options.max_batch_delay_ms / 1000, on_batch=count_batch)
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
