"""Load on `toolkit serve`: throughput and latency at several client counts, with dynamic
batching on and off, for tensor requests (JSON and the binary extension) and image requests,
beside a bare endpoint that only parses a request and runs onnxruntime.

The load is the requests `tritonclient.http` sends (the client a user of Triton or KServe would
point at it), built beforehand and sent from one event loop over one keep-alive connection per
client; tritonclient reads every answer. On a small machine the clients share the server's
cores: a client that encodes each request itself, or a thread per client, spends as much CPU as
the server and would measure itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.bench.measure import machine, percentile_us
from toolkit.core.contract import INPUT_NAME, OUTPUT_NAMES, image_model_name, serving_name
from toolkit.core.errors import ToolkitError
from toolkit.imaging.decode import encode_png, load_image
from toolkit.imaging.preprocess import preprocess
from toolkit.runtime.predictor import create_session
from toolkit.serving.eventloop import event_loop_runner
from toolkit.serving.launch import free_port, rss_mb, server_process, toolkit_server

KINDS = ("tensor-json", "tensor-binary", "image")
IMAGE_SIDES = (28, 112, 400)  # image requests: the example digits as PNG files of these sizes
BASELINE_MODEL_ENV = "TOOLKIT_BASELINE_ONNX"
BARE = "bare endpoint"
MALFORMED_BODY = b'{"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.5]}]}'


def _request(kind: str, model: str, images: np.ndarray, files: list[bytes], index: int) -> tuple[str, bytes, dict]:
    """One request of `kind`: its path, and the body and headers tritonclient would send."""
    import tritonclient.http as httpclient

    if kind == "image":
        model = image_model_name(model)
        tensor = httpclient.InferInput(INPUT_NAME, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([base64.b64encode(files[index % len(files)])], dtype=object),
                                   binary_data=True)
        outputs = None
    else:
        binary = kind == "tensor-binary"
        tensor = httpclient.InferInput(INPUT_NAME, [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images[index % len(images)][None], binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUT_NAMES]
    body, json_size = httpclient.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    return f"/v2/models/{model}/infer", body, headers


def _http_request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The bytes of one HTTP/1.1 POST, as a client sends them on a keep-alive connection."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: a prepared request at a time, its answer read by
    httptools (uvicorn's parser) as status, headers and body."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.parser_error = httptools.HttpParserError
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]] | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        _, connection = await asyncio.get_running_loop().create_connection(cls, host, port)
        return connection

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def send(self, request: bytes, timeout: float) -> tuple[int, dict[bytes, bytes], bytes]:
        """The server's status, headers (lower-case names) and body for `request`."""
        loop = asyncio.get_running_loop()
        self.answer, self.headers, self.body = loop.create_future(), {}, []
        late = loop.call_later(timeout, self._fail, TimeoutError(f"no answer within {timeout:g} s"))
        try:
            self.transport.write(request)
            return await self.answer
        finally:
            late.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.parser_error as exc:
            self._fail(ConnectionError(f"the answer is not HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("the server closed the connection"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def _fail(self, exc: Exception) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
        self.close()


def _problem(status: int, headers: dict[bytes, bytes], answer: bytes, malformed: bool) -> str | None:
    """What is wrong with an answer, or None: a malformed request must get a 400 with an error,
    any other a 200 that tritonclient reads as probabilities."""
    import tritonclient.http as httpclient

    if malformed:
        refused = status == 400 and b'"error"' in answer
        return None if refused else f"malformed request answered {status}: {answer[:120]!r}"
    if status != 200:
        return f"answered {status}: {answer[:120]!r}"
    length = headers.get(b"inference-header-content-length")
    result = httpclient.InferenceServerClient.parse_response_body(
        answer, header_length=None if length is None else int(length))
    return None if result.as_numpy(OUTPUT_NAMES[1]) is not None else "no probabilities"


def drive(url: str, model: str, kind: str, *, clients: int, requests: int, images: np.ndarray,
          files: list[bytes], malformed_every: int = 0, timeout: float = 120) -> dict[str, Any]:
    """`requests` requests of `kind` from `clients` concurrent clients against a running server,
    every `malformed_every`-th one malformed.

    Each client keeps one HTTP connection and sends bodies that tritonclient built beforehand
    (`generate_request_body`), then reads each answer with tritonclient (`parse_response_body`)."""
    from tritonclient.utils import InferenceServerException

    host, port = url.split("://", 1)[-1].rsplit(":", 1)
    prepared = [_http_request(host, *_request(kind, model, images, files, i)) for i in range(min(requests, 256))]
    malformed_request = _http_request(host, f"/v2/models/{model}/infer", MALFORMED_BODY,
                                      {"Content-Type": "application/json"})
    outcomes: list[tuple[float, str | None]] = []

    async def call(connection: _Connection | None, index: int) -> _Connection | None:
        """Sends request `index`, records its outcome; the connection to send the next one on."""
        malformed = malformed_every > 0 and index % malformed_every == malformed_every - 1
        started = time.perf_counter()
        try:
            if connection is None or connection.closed:
                connection = await _Connection.open(host, int(port))
            status, headers, answer = await connection.send(
                malformed_request if malformed else prepared[index % len(prepared)], timeout)
            problem = _problem(status, headers, answer, malformed)
        except (InferenceServerException, OSError, ValueError) as exc:
            if connection is not None:
                connection.close()  # the next call reconnects
            connection, problem = None, f"{type(exc).__name__}: {exc}"
        outcomes.append((time.perf_counter() - started, problem))
        return connection

    async def load() -> float:
        connection = None
        for index in range(min(clients, 8)):  # warm a connection and the model
            connection = await call(connection, index)
        if connection is not None:
            connection.close()
        outcomes.clear()
        indices = iter(range(requests))

        async def client() -> None:
            connection = None
            for index in indices:
                connection = await call(connection, index)
            if connection is not None:
                connection.close()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - started

    wall = event_loop_runner()(load())
    latencies = [seconds for seconds, problem in outcomes if problem is None]
    errors = [problem for _, problem in outcomes if problem is not None]
    return {
        "kind": kind, "clients": clients, "requests": requests,
        "malformed_requests": requests // malformed_every if malformed_every > 0 else 0,
        "errors": len(errors), "error_examples": errors[:3], "throughput_rps": requests / wall,
        "p50_ms": percentile_us(latencies, 50) / 1000 if latencies else None,
        "p99_ms": percentile_us(latencies, 99) / 1000 if latencies else None,
    }


def bare_endpoint() -> Any:
    """The baseline: an ASGI app that parses an OIP infer request (JSON, or the binary extension
    for one FP32 input), runs onnxruntime (the server's session options) on the model named by
    $TOOLKIT_BASELINE_ONNX and
    answers JSON, with no checks, batching, metrics or framework. What a request costs at
    least, measured in the same run as `toolkit serve`; a uvicorn factory."""
    import json
    import os

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    session = create_session(os.environ[BASELINE_MODEL_ENV], "cpu")  # the session options the server has

    async def infer(request: Request) -> Response:
        body = await request.body()
        length = request.headers.get("inference-header-content-length")
        header = json.loads(body[:int(length)] if length else body)
        tensor = header["inputs"][0]
        shape = tensor["shape"]
        pixels = (np.frombuffer(body[int(length):], dtype=np.float32) if length
                  else np.asarray(tensor["data"], dtype=np.float32)).reshape(shape)
        outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixels})
        return JSONResponse({"model_name": request.path_params["model"], "outputs": [
            {"name": name, "datatype": "FP32", "shape": list(value.shape), "data": value.ravel().tolist()}
            for name, value in zip(OUTPUT_NAMES, outputs, strict=True)]})

    async def ready(_: Request) -> Response:
        return Response(status_code=200)

    return Starlette(routes=[Route("/v2/models/{model}/infer", infer, methods=["POST"]),
                             Route("/v2/health/ready", ready)])


def _image_files(examples: list[Path]) -> list[bytes]:
    return [encode_png(load_image(path).convert("L").resize((side, side), Image.Resampling.BILINEAR))
            for path, side in itertools.product(examples, IMAGE_SIDES)]


def bench_oip(export_dir: str | Path, examples: list[Path], *,
              clients: tuple[int, ...] = (1, 16, 64), requests: int = 2000, kinds: tuple[str, ...] = KINDS,
              batching: tuple[bool, ...] = (True, False), workers: tuple[int, ...] = (1,), malformed_every: int = 0,
              baseline: bool = True, rounds: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every combination of kind and client count against `toolkit serve` with each batching
    setting (and, with `baseline`, the tensor kinds against `bare_endpoint`). All servers run at
    once and take turns over `rounds` rounds, so a machine that drifts mid-run hits each alike;
    a run's figures are the medians over its rounds. The requests carry `examples` (image files)
    as pixels, or as PNG files of 28 to 400 px. Server memory is read at start, after each run
    (a soak: many rounds of one kind) and at the end."""
    import os

    if requests <= 0 or rounds <= 0 or not clients or min(clients) <= 0 or not workers or min(workers) <= 0:
        raise ToolkitError("`clients`, `requests`, `workers` and `rounds` must be positive")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ToolkitError(f"unknown request kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    files = _image_files(examples)
    framed = [preprocess(path) for path in examples]
    images = np.stack([digit[None] for digit in framed if digit is not None]).astype(np.float32)
    model = serving_name(export_dir)
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[str, Any]] = {}
        for batched, processes in itertools.product(batching, workers):
            port = free_port()
            args = ["serve", str(export_dir), "--port", str(port), "--provider", "cpu", "--workers", str(processes),
                    *([] if batched else ["--max-batch-size", "1"])]
            url = f"http://127.0.0.1:{port}"
            name = f"toolkit serve, batching {'on' if batched else 'off'}" + (
                f", {processes} workers" if processes > 1 else "")
            servers[name] = (url, stack.enter_context(toolkit_server(
                args, ready_url=f"{url}/v2/health/ready",
                ready_line=f"{processes} worker processes" if processes > 1 else None)))
        if baseline and any(kind != "image" for kind in kinds):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {**os.environ, BASELINE_MODEL_ENV: str(Path(export_dir) / "model.onnx")}
            factory = f"{bare_endpoint.__module__}:{bare_endpoint.__qualname__}"  # renames reach it
            command = ["uvicorn", factory, "--factory", "--port", str(port), "--no-access-log", "--log-level",
                       "warning"]
            servers[BARE] = (url, stack.enter_context(
                server_process(command, ready_url=f"{url}/v2/health/ready", env=env)))
        memory_before = {name: rss_mb(process.pid) for name, (_, process) in servers.items()}
        measured: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for round_number, kind, count in itertools.product(range(1, rounds + 1), kinds, clients):
            for name, (url, process) in servers.items():
                if name == BARE and kind == "image":
                    continue
                log(f"round {round_number}/{rounds}: {name}, {count} clients, {requests} {kind} requests")
                run = drive(url, model, kind, clients=count, requests=requests, images=images, files=files,
                            malformed_every=0 if name == BARE else malformed_every)
                measured.setdefault((name, kind, count), []).append({**run, "server_rss_mb": rss_mb(process.pid)})
        memory_after = {name: rss_mb(process.pid) for name, (_, process) in servers.items()}
    runs = [_median_run(name, results) for (name, _, _), results in measured.items()]
    return {"kind": "serve-oip", "machine": machine(), "export": str(export_dir), "model": model,
            "requests_per_run": requests, "rounds": rounds, "image_sides": list(IMAGE_SIDES), "runs": runs,
            "servers": [{"server": name, "rss_mb_before": memory_before[name], "rss_mb_after": memory_after[name]}
                        for name in servers]}


def _median_run(server: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures over its rounds: medians of the rates and percentiles, errors summed."""
    def median(key: str) -> float | None:
        values = [r[key] for r in results if r[key] is not None]
        return statistics.median(values) if values else None

    first = results[0]
    return {"server": server, "kind": first["kind"], "clients": first["clients"], "requests": first["requests"],
            "rounds": len(results), "malformed_requests": sum(r["malformed_requests"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "error_examples": [e for r in results for e in r["error_examples"]][:3],
            "throughput_rps": median("throughput_rps"), "p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"),
            "throughput_rps_each_round": [r["throughput_rps"] for r in results],
            "server_rss_mb_each_round": [r["server_rss_mb"] for r in results]}
