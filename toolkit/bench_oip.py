"""Load on `toolkit serve`: throughput and latency at several client counts, with dynamic
batching on and off, for tensor requests (JSON and the binary extension) and image requests,
beside a bare endpoint that only parses a request and runs onnxruntime.

The load is `tritonclient.http`, the client a user of Triton or KServe would point at it, one
synchronous client with a keep-alive connection per thread (its asyncio client spends more
CPU than the server on a small machine, and would measure itself).
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.bench import machine, percentile_us
from toolkit.contract import INPUT_NAME, OUTPUT_NAMES, image_model_name, serving_name
from toolkit.decode import load_image
from toolkit.errors import ToolkitError
from toolkit.launch import free_port, rss_mb, server_process, toolkit_server
from toolkit.preprocess import preprocess

KINDS = ("tensor-json", "tensor-binary", "image")
IMAGE_SIDES = (28, 112, 400)  # image requests: the example digits as PNG files of these sizes
BASELINE_MODEL_ENV = "TOOLKIT_BASELINE_ONNX"
MALFORMED_BODY = b'{"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.5]}]}'


def _request(kind: str, model: str, images: np.ndarray, files: list[bytes], index: int) -> Callable[[Any], Any]:
    """One request of `kind` as a call on a tritonclient (checked by the caller)."""
    import tritonclient.http as httpclient

    if kind == "image":
        tensor = httpclient.InferInput(INPUT_NAME, [1], "BYTES")
        data = np.array([base64.b64encode(files[index % len(files)])], dtype=object)
        tensor.set_data_from_numpy(data, binary_data=True)
        return lambda client: client.infer(image_model_name(model), [tensor])
    binary = kind == "tensor-binary"
    tensor = httpclient.InferInput(INPUT_NAME, [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(images[index % len(images)][None], binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUT_NAMES]
    return lambda client: client.infer(model, [tensor], outputs=outputs)


def drive(url: str, model: str, kind: str, *, clients: int, requests: int, images: np.ndarray,
          files: list[bytes], malformed_every: int = 0) -> dict[str, Any]:
    """`requests` requests of `kind` from `clients` threads against a running server."""
    import httpx
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    host = url.split("://", 1)[-1]
    local = threading.local()
    calls = [_request(kind, model, images, files, i) for i in range(min(requests, 256))]

    def call(index: int) -> tuple[float, str | None]:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(host, network_timeout=120)
            local.http = httpx.Client(timeout=120)
        malformed = malformed_every > 0 and index % malformed_every == malformed_every - 1
        started = time.perf_counter()
        try:
            if malformed:
                response = local.http.post(f"{url}/v2/models/{model}/infer", content=MALFORMED_BODY)
                problem = None if response.status_code == 400 and "error" in response.json() else (
                    f"malformed request answered {response.status_code}: {response.text[:120]}")
            else:
                result = calls[index % len(calls)](local.client)
                problem = None if result.as_numpy(OUTPUT_NAMES[1]) is not None else "no probabilities"
        except (InferenceServerException, httpx.HTTPError, OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        return time.perf_counter() - started, problem

    for index in range(min(clients, 8)):  # warm the connections and the model
        call(index)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        outcomes = list(pool.map(call, range(requests)))
    wall = time.perf_counter() - started
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
    for one FP32 input), runs onnxruntime on the model named by $TOOLKIT_BASELINE_ONNX and
    answers JSON, with no checks, batching, metrics or framework. What a request costs at
    least, measured in the same run as `toolkit serve`; a uvicorn factory."""
    import json
    import os

    import onnxruntime as ort
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    session = ort.InferenceSession(os.environ[BASELINE_MODEL_ENV], providers=["CPUExecutionProvider"])

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
    files = []
    for path, side in itertools.product(examples, IMAGE_SIDES):
        buffer = io.BytesIO()
        load_image(path).convert("L").resize((side, side), Image.Resampling.BILINEAR).save(buffer, "PNG")
        files.append(buffer.getvalue())
    return files


def bench_oip(export_dir: str | Path, examples: list[Path], *,
              clients: tuple[int, ...] = (1, 16, 64), requests: int = 2000, kinds: tuple[str, ...] = KINDS,
              batching: tuple[bool, ...] = (True, False), malformed_every: int = 0, baseline: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every combination of batching, kind and client count against `toolkit serve`, one server
    per batching setting, with its memory after each run; the requests carry `examples` (image
    files) as pixels, or as PNG files of 28 to 400 px. With `baseline`, the tensor kinds also
    against `bare_endpoint` in the same run."""
    import os

    if requests <= 0 or not clients or min(clients) <= 0:
        raise ToolkitError("`clients` and `requests` must be positive")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ToolkitError(f"unknown request kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    files = _image_files(examples)
    framed = [preprocess(path) for path in examples]
    images = np.stack([digit[None] for digit in framed if digit is not None]).astype(np.float32)
    model = serving_name(export_dir)
    runs: list[dict[str, Any]] = []

    def measure(server: str, url: str, pid: int, kinds: tuple[str, ...]) -> None:
        for kind, count in itertools.product(kinds, clients):
            log(f"{server}: {count} clients, {requests} {kind} requests")
            run = drive(url, model, kind, clients=count, requests=requests, images=images, files=files,
                        malformed_every=malformed_every if server != "bare endpoint" else 0)
            runs.append({"server": server, **run, "server_rss_mb_after": rss_mb(pid)})

    for batched in batching:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = ["serve", str(export_dir), "--port", str(port), "--provider", "cpu",
                *([] if batched else ["--max-batch-size", "1"])]
        with toolkit_server(args, ready_url=f"{url}/v2/health/ready") as server:
            measure(f"toolkit serve, batching {'on' if batched else 'off'}", url, server.pid, kinds)
    tensor_kinds = tuple(kind for kind in kinds if kind != "image")
    if baseline and tensor_kinds:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, BASELINE_MODEL_ENV: str(Path(export_dir) / "model.onnx")}
        command = ["uvicorn", "toolkit.bench_oip:bare_endpoint", "--factory", "--port", str(port),
                   "--no-access-log", "--log-level", "warning"]
        with server_process(command, ready_url=f"{url}/v2/health/ready", env=env) as server:
            measure("bare endpoint", url, server.pid, tensor_kinds)
    return {"kind": "serve-oip", "machine": machine(), "export": str(export_dir), "model": model,
            "requests_per_run": requests, "image_sides": list(IMAGE_SIDES), "runs": runs}
