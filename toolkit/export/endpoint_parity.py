"""Parity at a served endpoint: the export's test set, sent through any Open Inference Protocol
server (`toolkit serve`, Triton, KServe), against the export's PyTorch reference.

Every output the model has is checked: the metadata must declare the contract's outputs and no
others, each answer must carry them with the right datatype and shape, and each is held to
`toolkit verify`'s rules (fp32: atol + rtol x |reference|, the same top-1 everywhere, finite).
The image model (`NAME-image`, when the endpoint has one) is held to `toolkit predict`'s
answers on the same image files, label and probabilities. Run it after every deployment.

Nothing the endpoint sends is trusted (`Endpoint`): every answer is bounded in size and pace,
and all of them together in time.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import anyio
import httpx
import numpy as np
from anyio.from_thread import BlockingPortal, start_blocking_portal

from toolkit.core.contract import INPUT_NAME, OUTPUT_NAMES, image_model_name
from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.core.fileio import write_json
from toolkit.export.verify import (
    DEFAULT_MAX_ACC_DROP,
    ParityReport,
    Reference,
    check_tolerances,
    compare_each,
    reference_outputs,
)
from toolkit.imaging.decode import encode_png
from toolkit.runtime.inference import classify
from toolkit.runtime.predictor import Predictor
from toolkit.runtime.runners import Runner

IMAGE_SAMPLES = 200  # test digits sent to the image model as PNG files
IMAGE_BATCH = 50
DEFAULT_DEADLINE_S = 600.0  # for all the endpoint's answers together
DEFAULT_MAX_ANSWER_MB = 16.0  # each answer; a batch of 500 digits is 40 KB binary, 300 KB as JSON
READ_TIMEOUT_S = 60.0  # the longest silence within one answer
CONNECT_TIMEOUT_S = 10.0

# output name -> (datatype, shape of one image's answer): what an answer must carry.
Contract = dict[str, tuple[str, tuple[int, ...]]]


def tensor_contract(classes: int) -> Contract:
    return {name: ("FP32", (classes,)) for name in OUTPUT_NAMES}


def image_contract(classes: int) -> Contract:
    """What `toolkit serve`'s image model answers (toolkit/serving/oip.py, ImageModel)."""
    return {"label": ("BYTES", ()), OUTPUT_NAMES[1]: ("FP32", (classes,))}


def _base_url(url: str) -> str:
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
    return f"{parsed.scheme}://{parsed.netloc}"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes


class Endpoint:
    """An OIP server as verify talks to it, trusting nothing it sends. Answers come in the
    identity encoding only (no other is asked for, and one not asked for is refused, so nothing
    is ever decompressed), each at most `max_answer_mb` (by Content-Length before reading, and
    while reading), with at most READ_TIMEOUT_S of silence, and all of them together within
    `deadline` seconds: a server that sends a byte a second, in its headers or its body, is
    ended by the deadline. Made by `connect`."""

    def __init__(self, url: str, portal: BlockingPortal, client: httpx.AsyncClient, deadline: float,
                 max_answer_mb: float) -> None:
        self.url, self._portal, self._client = url, portal, client
        self.deadline, self.max_answer_mb = deadline, max_answer_mb
        self.spent = 0.0  # seconds spent on the endpoint's answers so far

    def exchange(self, what: str, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> Answer:
        """One request and its whole answer, within what is left of the deadline."""
        return self._portal.call(self._exchange, what, method, path, body, headers)

    async def _exchange(self, what: str, method: str, path: str, body: bytes | None,
                        headers: dict[str, str] | None) -> Answer:
        started = time.monotonic()
        try:
            with anyio.fail_after(max(self.deadline - self.spent, 0)):
                return await self._read(what, method, path, body, headers)
        except TimeoutError:
            raise ToolkitError(f"{self.url} did not finish answering {what} within the {self.deadline:g} s it "
                               "is given for all its answers (--deadline): too slow") from None
        except httpx.ConnectTimeout:
            raise ToolkitError(f"cannot reach {self.url} for {what}: no connection within {CONNECT_TIMEOUT_S:g} s"
                               ) from None
        except httpx.TimeoutException:
            raise ToolkitError(f"{self.url} went silent for {READ_TIMEOUT_S:g} s while answering {what}: too slow"
                               ) from None
        except httpx.ConnectError as exc:
            raise ToolkitError(f"cannot reach {self.url} for {what}: {exc}") from None
        except httpx.HTTPError as exc:  # a broken connection, or bytes that are not HTTP
            raise ToolkitError(f"{self.url} broke off its answer to {what}: {type(exc).__name__}: {exc}") from None
        finally:
            self.spent += time.monotonic() - started

    async def _read(self, what: str, method: str, path: str, body: bytes | None,
                    headers: dict[str, str] | None) -> Answer:
        cap = int(self.max_answer_mb * 2**20)
        too_big = f"{self.url} answered {what} with"
        limit = f"more than {self.max_answer_mb:g} MB, the most an answer may have (--max-answer-mb)"
        async with self._client.stream(method, path, content=body, headers=headers) as response:
            encoding = response.headers.get("Content-Encoding", "identity")
            if encoding.strip().lower() != "identity":
                raise ToolkitError(f"{too_big} Content-Encoding {encoding!r}, which verify did not ask for "
                                   "(it reads answers as they are, to bound what it reads)")
            declared = response.headers.get("Content-Length")  # h11 has checked it is a number
            if declared is not None and int(declared) > cap:
                raise ToolkitError(f"{too_big} {int(declared):,} bytes, {limit}")
            data = bytearray()
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > cap:
                    raise ToolkitError(f"{too_big} {limit}")
            return Answer(response.status_code, response.headers, bytes(data))

    def _refused(self, what: str, answer: Answer) -> ToolkitError:
        try:
            message = json.loads(answer.body)["error"]
        except (ValueError, TypeError, KeyError, RecursionError):
            message = answer.body[:200].decode("utf-8", "replace")
        return ToolkitError(f"{self.url} refused {what}: HTTP {answer.status}: {message}")

    def ok(self, what: str, path: str) -> bool:
        """Whether a GET of `path` answers 200 (health and readiness)."""
        return self.exchange(what, "GET", path).status == 200

    def metadata(self, model: str) -> dict[str, Any]:
        what = f"a metadata request for {model}"
        answer = self.exchange(what, "GET", f"/v2/models/{quote(model, safe='')}")
        if answer.status != 200:
            raise self._refused(what, answer)
        try:
            data = json.loads(answer.body)
        except (ValueError, RecursionError) as exc:
            raise ToolkitError(f"{self.url} answered {what} with something that is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ToolkitError(f"{self.url} answered {what} with JSON that is not an object")
        return data

    def infer(self, model: str, inputs: list[Any], contract: Contract, rows: int) -> dict[str, np.ndarray]:
        """The outputs of `contract` for `rows` images, asked for in binary and checked: names,
        datatypes, shapes. tritonclient encodes the request and decodes the answer."""
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in contract]
        body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
        headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
        what = f"an infer request to {model}"
        answer = self.exchange(what, "POST", f"/v2/models/{quote(model, safe='')}/infer", body, headers)
        if answer.status != 200:
            raise self._refused(what, answer)
        length = answer.headers.get("Inference-Header-Content-Length")
        if length is not None and not (length.isdigit() and int(length) <= len(answer.body)):
            raise ToolkitError(f"{self.url} answered {what} with Inference-Header-Content-Length {length!r} "
                               f"for a body of {len(answer.body):,} bytes")
        try:
            result = httpclient.InferenceServerClient.parse_response_body(
                answer.body, header_length=None if length is None else int(length))
        except (ValueError, RecursionError, InferenceServerException) as exc:  # the JSON header does not parse
            raise ToolkitError(f"{self.url} answered {what} with something that is not JSON: {exc}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise ToolkitError(f"{self.url} answered {what} with JSON that is not an infer answer: {exc!r}") from None
        return _outputs(self.url, model, result, contract, rows)


@contextmanager
def connect(url: str, *, deadline: float = DEFAULT_DEADLINE_S,
            max_answer_mb: float = DEFAULT_MAX_ANSWER_MB) -> Iterator[Endpoint]:
    """The OIP endpoint at `url` (its root) as an `Endpoint`. One httpx.AsyncClient, run by an
    anyio portal: the deadline cancels a request wherever it stands."""
    try:
        import tritonclient.http  # noqa: F401  (encodes requests, decodes answers)
    except ImportError:
        raise ToolkitError("checking an endpoint needs an OIP client: pip install 'toolkit[serve]'") from None
    for name, value in (("deadline", deadline), ("max_answer_mb", max_answer_mb)):
        if not (math.isfinite(value) and value > 0):
            raise ToolkitError(f"must be a finite number > 0, got {value}", option=name)
    base = _base_url(url)
    with start_blocking_portal() as portal:
        client = httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                                   headers={"Accept-Encoding": "identity"}, trust_env=False)
        try:
            yield Endpoint(url, portal, client, deadline, max_answer_mb)
        finally:
            portal.call(client.aclose)


def _outputs(url: str, model: str, result: Any, contract: Contract, rows: int) -> dict[str, np.ndarray]:
    """The answer's outputs by name, when they are exactly the contract's outputs, each with
    its datatype and the shape for `rows` images."""
    from tritonclient.utils import InferenceServerException

    response = result.get_response()
    answered = response.get("outputs") if isinstance(response, dict) else None
    if not isinstance(answered, list) or not all(isinstance(output, dict) for output in answered):
        raise ToolkitError(f"{url}: {model} answered JSON that is not an infer answer (no list of outputs)")
    names = [output.get("name") for output in answered]
    if sorted(map(repr, names)) != sorted(map(repr, contract)):
        raise ToolkitError(f"{url}: {model} answered outputs {names}, expected {list(contract)}")
    arrays = {}
    for output in answered:
        name = output["name"]
        datatype, dims = contract[name]
        if output.get("datatype") != datatype:
            raise ToolkitError(f"{url}: {model} answered {name} as {output.get('datatype')!r}, expected {datatype}")
        try:
            array = result.as_numpy(name)
        except (ValueError, TypeError, KeyError, IndexError, struct.error, InferenceServerException) as exc:
            raise ToolkitError(f"{url}: {model} answered {name} that does not decode: {exc}") from None
        if array.shape != (rows, *dims):
            raise ToolkitError(f"{url}: {model} answered {name} of shape {list(array.shape)}, "
                               f"expected {[rows, *dims]}")
        arrays[name] = array
    return arrays


def _check_declared(url: str, model: str, metadata: dict[str, Any], contract: Contract) -> None:
    """The model's metadata declares the contract's outputs, with their datatypes, and no others."""
    declared = metadata.get("outputs")
    if not isinstance(declared, list) or not all(isinstance(output, dict) for output in declared):
        raise ToolkitError(f"{url}: {model} declares no list of outputs in its metadata")
    pairs = [(output.get("name"), output.get("datatype")) for output in declared]
    expected = [(name, datatype) for name, (datatype, _) in contract.items()]
    if sorted(map(repr, pairs)) != sorted(map(repr, expected)):
        raise ToolkitError(f"{url}: {model} declares outputs {[name for name, _ in pairs]} in its metadata "
                           f"(datatypes {[datatype for _, datatype in pairs]}); the export's contract has "
                           f"{list(contract)} ({[datatype for _, datatype in expected]})")


def oip_runner(endpoint: Endpoint, model: str, classes: int) -> Runner:
    """The tensor model `model` at an OIP endpoint as a Runner (binary tensor extension)."""
    import tritonclient.http as httpclient

    contract = tensor_contract(classes)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tensor = httpclient.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), binary_data=True)
        outputs = endpoint.infer(model, [tensor], contract, len(batch))
        return outputs[OUTPUT_NAMES[0]], outputs[OUTPUT_NAMES[1]]
    return run


def _image_answers(endpoint: Endpoint, model: str, files: list[bytes], classes: int
                   ) -> tuple[np.ndarray, list[str]]:
    """The image model's probabilities and labels for `files`, in batches of IMAGE_BATCH."""
    import tritonclient.http as httpclient

    contract = image_contract(classes)
    rows, labels = [], []
    for start in range(0, len(files), IMAGE_BATCH):
        chunk = files[start:start + IMAGE_BATCH]
        tensor = httpclient.InferInput(INPUT_NAME, [len(chunk)], "BYTES")
        tensor.set_data_from_numpy(np.array([base64.b64encode(f) for f in chunk], dtype=object), binary_data=True)
        outputs = endpoint.infer(model, [tensor], contract, len(chunk))
        rows.append(outputs[OUTPUT_NAMES[1]])
        labels += [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in outputs["label"]]
    return np.concatenate(rows), labels


def _image_check(endpoint: Endpoint, model: str, export: Export, reference: Reference,
                 report: ParityReport) -> None:
    """The image model against `toolkit predict` (the export's ONNX model behind the same
    preprocessing) on the first IMAGE_SAMPLES test digits, sent as PNG files: probabilities
    under the fp32 rules, labels equal ("" where predict finds nothing to classify)."""
    predictor = Predictor(export, provider="cpu")
    pixels = reference.batches[0][:IMAGE_SAMPLES, 0]  # the test set comes first
    files = [encode_png(image) for image in pixels]
    local = np.zeros((len(files), reference.num_classes), dtype=np.float32)
    local_labels = []
    for index, data in enumerate(files):
        answer = classify(predictor, data, top_k=reference.num_classes)
        local_labels.append(answer.label or "")
        for ranked in answer.top_k:
            local[index, predictor.class_names.index(ranked["label"])] = ranked["probability"]
    served, labels = _image_answers(endpoint, model, files, reference.num_classes)
    result = compare_each(endpoint.url, "fp32", {OUTPUT_NAMES[1]: (served, local)}, reference.labels[:len(files)],
                          True, report)
    differ = [i for i, (label, expected) in enumerate(zip(labels, local_labels, strict=True)) if label != expected]
    if differ and result.passed:
        first = differ[0]
        result.passed, result.failure = False, "tolerance"
        result.reason = (f"label differs from toolkit predict's on {len(differ)} of {len(files)} images "
                         f"(first: image {first}, {labels[first]!r} where predict says {local_labels[first]!r})")
    report.backends[model] = result


def verify_endpoint(
    export_dir: str | Path,
    url: str,
    *,
    model: str | None = None,
    data_dir: str | Path | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    deadline: float = DEFAULT_DEADLINE_S,
    max_answer_mb: float = DEFAULT_MAX_ANSWER_MB,
    json_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Send the export's test set and edge batches through the OIP endpoint at `url` (model
    `model`, default: the export's serving name) and compare every output with the export's
    PyTorch model; the image model `MODEL-image` too when the endpoint serves one. The endpoint
    gets `deadline` seconds for all its answers and `max_answer_mb` for each. Writes the report
    (with the endpoint, the model and the seconds taken) to `json_path` when given."""
    check_tolerances(atol, rtol, DEFAULT_MAX_ACC_DROP)
    export = Export(export_dir)
    if not export.path.is_dir():
        raise ToolkitError(f"export dir not found: {export}")
    model = model or export.served_name
    image_model = image_model_name(model)
    with connect(url, deadline=deadline, max_answer_mb=max_answer_mb) as endpoint:
        if not endpoint.ok("a liveness check", "/v2/health/live"):
            raise ToolkitError(f"cannot reach a live OIP server at {url}")
        if not endpoint.ok("a readiness check", f"/v2/models/{quote(model, safe='')}/ready"):
            raise ToolkitError(f"{url} has no ready model {model!r}; pass the served name with `model`")
        metadata = endpoint.metadata(model)
        has_image = endpoint.ok("a readiness check", f"/v2/models/{quote(image_model, safe='')}/ready")
        reference = reference_outputs(export, data_dir)
        _check_declared(url, model, metadata, tensor_contract(reference.num_classes))
        if has_image:
            _check_declared(url, image_model, endpoint.metadata(image_model), image_contract(reference.num_classes))
        report = reference.report(atol, rtol, DEFAULT_MAX_ACC_DROP)  # every check here is fp32
        served, exported = _served_checkpoint(metadata), _exported_checkpoint(export)
        if served and exported and served != exported:  # a server that does not say is judged by its answers
            report.integrity[model] = f"the endpoint serves checkpoint {served[:12]}, the export is of {exported[:12]}"
        started = time.perf_counter()
        if progress:
            progress(model)
        report.backends[model] = reference.compare(url, "fp32", oip_runner(endpoint, model, reference.num_classes),
                                                  report)
        if has_image:
            if progress:
                progress(image_model)
            _image_check(endpoint, image_model, export, reference, report)
    report.passed = all(r.passed for r in report.backends.values()) and not report.integrity
    if json_path is not None:
        write_json(Path(json_path), {**report.to_json(), "endpoint": url, "model": model,
                                     "seconds": time.perf_counter() - started})
    return report


def _exported_checkpoint(export: Export) -> str | None:
    value = (export.manifest().get("metadata") or {}).get("source_checkpoint_sha256")
    return value if isinstance(value, str) else None


def _served_checkpoint(metadata: dict[str, Any]) -> str | None:
    parameters = metadata.get("parameters")
    value = parameters.get("checkpoint_sha256") if isinstance(parameters, dict) else None
    return value if isinstance(value, str) else None
