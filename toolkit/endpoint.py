"""Parity at a served endpoint: the export's test set, sent through any Open Inference Protocol
server (`toolkit serve`, Triton, KServe), against the export's PyTorch reference.

The tensor model is held to `toolkit verify`'s fp32 rules (atol + rtol x |reference|, the same
top-1 everywhere); an image model (`NAME-image`, when the endpoint has one) to the answers of
`toolkit predict` on the same image files. Run it after every deployment.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from toolkit.contract import INPUT_NAME, OUTPUT_NAMES, image_model_name, serving_name
from toolkit.decode import encode_png
from toolkit.errors import ToolkitError
from toolkit.fileio import write_json
from toolkit.inference import classify
from toolkit.manifest import read_manifest
from toolkit.runners import Runner
from toolkit.runtime import Predictor
from toolkit.verify import (
    DEFAULT_MAX_ACC_DROP,
    ParityReport,
    Reference,
    check_tolerances,
    compare_outputs,
    reference_outputs,
)

IMAGE_SAMPLES = 200  # test digits sent to the image model as PNG files
IMAGE_BATCH = 50


def _client(url: str) -> Any:
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise ToolkitError("checking an endpoint needs an OIP client: pip install 'toolkit[serve]'") from None
    try:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        parsed.port  # noqa: B018  (parses the port: raises on a bad one)
    except ValueError as exc:
        raise ToolkitError(f"not a valid URL: {url!r} ({exc})", option="endpoint") from None
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ToolkitError(f"not an http(s) URL: {url!r}", option="endpoint")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        # The protocol's routes start at the server's root (/v2/...); a client cannot add a prefix.
        raise ToolkitError(f"takes the server's root (scheme, host and port), not a path or query: {url!r}",
                           option="endpoint")
    return httpclient.InferenceServerClient(parsed.netloc, ssl=parsed.scheme == "https", network_timeout=60,
                                            connection_timeout=10)


def _call(what: str, url: str, function: Callable[[], Any]) -> Any:
    from tritonclient.utils import InferenceServerException

    try:
        return function()
    except InferenceServerException as exc:
        raise ToolkitError(f"{url} refused {what}: {exc.message() or exc}") from None
    except (OSError, Exception) as exc:  # geventhttpclient's socket and timeout errors
        raise ToolkitError(f"cannot reach {url} for {what}: {type(exc).__name__}: {exc}") from None


def oip_runner(client: Any, url: str, model: str, classes: int) -> Runner:
    """The tensor model `model` at an OIP endpoint as a Runner (binary tensor extension); an
    answer that is not two float arrays [N, classes] is one ToolkitError."""
    import tritonclient.http as httpclient

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tensor = httpclient.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), binary_data=True)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in OUTPUT_NAMES]
        result = _call(f"an infer request to {model}", url, lambda: client.infer(model, [tensor], outputs=outputs))
        try:
            answers = [np.asarray(result.as_numpy(name), dtype=np.float32) for name in OUTPUT_NAMES]
        except (ValueError, TypeError) as exc:
            raise ToolkitError(f"{url}: {model} answered outputs that do not decode: {exc}") from None
        if any(answer.shape != (len(batch), classes) for answer in answers):
            raise ToolkitError(f"{url}: {model} answered shapes {[list(a.shape) for a in answers]} for "
                               f"{len(batch)} images, expected [{len(batch)}, {classes}]")
        return answers[0], answers[1]
    return run


def _image_answers(client: Any, url: str, model: str, files: list[bytes], classes: int) -> np.ndarray:
    import tritonclient.http as httpclient

    rows = []
    for start in range(0, len(files), IMAGE_BATCH):
        chunk = files[start:start + IMAGE_BATCH]
        tensor = httpclient.InferInput(INPUT_NAME, [len(chunk)], "BYTES")
        tensor.set_data_from_numpy(np.array([base64.b64encode(f) for f in chunk], dtype=object), binary_data=True)
        result = _call(f"an infer request to {model}", url, lambda t=tensor: client.infer(model, [t]))
        try:
            probabilities = np.asarray(result.as_numpy(OUTPUT_NAMES[1]), dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise ToolkitError(f"{url}: {model} answered probabilities that do not decode: {exc}") from None
        if probabilities.shape != (len(chunk), classes):
            raise ToolkitError(f"{url}: {model} did not answer probabilities [{len(chunk)}, {classes}]")
        rows.append(probabilities.astype(np.float32))
    return np.concatenate(rows)


def _image_check(client: Any, url: str, model: str, export_dir: Path, reference: Reference,
                 report: ParityReport) -> None:
    """The image model against `toolkit predict` (the export's ONNX model behind the same
    preprocessing) on the first IMAGE_SAMPLES test digits, sent as PNG files."""
    predictor = Predictor(export_dir, provider="cpu")
    pixels = reference.batches[0][:IMAGE_SAMPLES, 0]  # the test set comes first
    files = [encode_png(image) for image in pixels]
    local = np.zeros((len(files), reference.num_classes), dtype=np.float32)
    for index, data in enumerate(files):
        answer = classify(predictor, data, top_k=reference.num_classes)
        for ranked in answer.top_k:
            local[index, predictor.class_names.index(ranked["label"])] = ranked["probability"]
    served = _image_answers(client, url, model, files, reference.num_classes)
    report.backends[model] = compare_outputs(url, "fp32", served, local, reference.labels[:len(files)],
                                             True, report.atol, report.rtol, report.max_acc_drop)


def verify_endpoint(
    export_dir: str | Path,
    url: str,
    *,
    model: str | None = None,
    data_dir: str | Path | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    json_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Send the export's test set and edge batches through the OIP endpoint at `url` (model
    `model`, default: the export's serving name) and compare with the export's PyTorch model;
    the image model `MODEL-image` too when the endpoint serves one. Writes the report (with the
    endpoint, the model and the seconds taken) to `json_path` when given."""
    check_tolerances(atol, rtol, DEFAULT_MAX_ACC_DROP)
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ToolkitError(f"export dir not found: {export_dir}")
    model = model or serving_name(export_dir)
    client = _client(url)
    if not _call("a liveness check", url, client.is_server_live):
        raise ToolkitError(f"cannot reach a live OIP server at {url}")
    if not _call("a readiness check", url, lambda: client.is_model_ready(model)):
        raise ToolkitError(f"{url} has no ready model {model!r}; pass the served name with `model`")
    reference = reference_outputs(export_dir, data_dir)
    report = reference.report(atol, rtol, DEFAULT_MAX_ACC_DROP)  # every check here is fp32
    served, exported = _served_checkpoint(client, url, model), _exported_checkpoint(export_dir)
    if served and exported and served != exported:  # a server that does not say is judged by its answers
        report.integrity[model] = f"the endpoint serves checkpoint {served[:12]}, the export is of {exported[:12]}"
    started = time.perf_counter()
    if progress:
        progress(model)
    report.backends[model] = reference.compare(url, "fp32", oip_runner(client, url, model, reference.num_classes),
                                              report)
    image_model = image_model_name(model)
    if _call("a readiness check", url, lambda: client.is_model_ready(image_model)):
        if progress:
            progress(image_model)
        _image_check(client, url, image_model, export_dir, reference, report)
    report.passed = all(r.passed for r in report.backends.values()) and not report.integrity
    if json_path is not None:
        write_json(Path(json_path), {**report.to_json(), "endpoint": url, "model": model,
                                     "seconds": time.perf_counter() - started})
    return report


def _exported_checkpoint(export_dir: Path) -> str | None:
    value = (read_manifest(export_dir).get("metadata") or {}).get("source_checkpoint_sha256")
    return value if isinstance(value, str) else None


def _served_checkpoint(client: Any, url: str, model: str) -> str | None:
    metadata = _call("a metadata request", url, lambda: client.get_model_metadata(model))
    parameters = metadata.get("parameters") if isinstance(metadata, dict) else None
    value = parameters.get("checkpoint_sha256") if isinstance(parameters, dict) else None
    return value if isinstance(value, str) else None
