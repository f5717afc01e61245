"""`toolkit verify --endpoint` against hostile endpoints: small OIP servers on 127.0.0.1, in a
thread of the test, that answer the export's own model honestly except for the one thing each
test makes them do wrong (an output, a size, a pace). A real `toolkit serve` passing the same
check is `tests/test_serve.py::test_verify_endpoint_passes_against_the_server_and_writes_its_report`."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.helpers import cli_in_process
from toolkit.runtime.inference import classify
from toolkit.runtime.predictor import Predictor
from toolkit.runtime.runners import onnx_runner

DRIBBLE_BYTES = 300  # a slow endpoint's answer: one byte a second, then it gives up

# (model, outputs by name) -> outputs by name: what a test's endpoint does to honest answers.
Tamper = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]
# (handler, model, outputs by name) -> None: how a test's endpoint sends an infer answer.
Send = Callable[[BaseHTTPRequestHandler, str, dict[str, np.ndarray]], None]


def _binary_answer(model: str, outputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """An infer answer in the binary tensor extension: the JSON header and its length."""
    header, blobs = [], []
    for name, value in outputs.items():
        if value.dtype == object:
            blob = b"".join(struct.pack("<I", len(v)) + v for v in (s.encode() for s in value.ravel()))
            datatype = "BYTES"
        else:
            blob, datatype = np.ascontiguousarray(value, dtype=np.float32).tobytes(), "FP32"
        header.append({"name": name, "datatype": datatype, "shape": list(value.shape),
                       "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = json.dumps({"model_name": model, "outputs": header}).encode()
    return head + b"".join(blobs), len(head)


def send_binary(handler: BaseHTTPRequestHandler, model: str, outputs: dict[str, np.ndarray]) -> None:
    body, header_length = _binary_answer(model, outputs)
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Inference-Header-Content-Length", str(header_length))
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _bytes_elements(data: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        elements.append(data[offset + 4:offset + 4 + size])
        offset += 4 + size
    return elements


class FakeEndpoint:
    """The export's ONNX model behind the parts of the Open Inference Protocol verify uses:
    `NAME` (logits, probabilities) and `NAME-image` (label, probabilities), with `declared`
    extra outputs in the metadata, answers passed through `tamper` and sent by `send`."""

    def __init__(self, export: Path, *, image: bool = False, tamper: Tamper | None = None,
                 send: Send = send_binary, declared: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.run = onnx_runner(export / "model.onnx", "cpu")
        self.predictor = Predictor(export, provider="cpu") if image else None
        self.tamper, self.send, self.declared = tamper or (lambda model, outputs: outputs), send, declared or {}
        classes = len(Predictor(export, provider="cpu").class_names)
        self.metadata = {
            "lenet": [{"name": n, "datatype": "FP32", "shape": [-1, classes]} for n in ("logits", "probabilities")],
            "lenet-image": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]}]}
        if not image:
            del self.metadata["lenet-image"]

    def answer(self, model: str, body: bytes, header_length: int) -> dict[str, np.ndarray]:
        request = json.loads(body[:header_length])
        (tensor,) = request["inputs"]
        data = body[header_length:]
        if model == "lenet":
            logits, probabilities = self.run(np.frombuffer(data, np.float32).reshape(tensor["shape"]))
            return {"logits": logits, "probabilities": probabilities}
        classes = self.predictor.class_names
        labels, rows = [], []
        for element in _bytes_elements(data):
            answer = classify(self.predictor, base64.b64decode(element), top_k=len(classes))
            row = np.zeros(len(classes), dtype=np.float32)
            for ranked in answer.top_k:
                row[classes.index(ranked["label"])] = ranked["probability"]
            labels.append(answer.label or "")
            rows.append(row)
        return {"label": np.array(labels, dtype=object), "probabilities": np.stack(rows)}

    @contextmanager
    def serving(self) -> Iterator[str]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                if parts == ["v2", "health", "live"]:
                    return self._json(200, {"live": True})
                if len(parts) >= 3 and parts[:2] == ["v2", "models"] and parts[2] in endpoint.metadata:
                    model = parts[2]
                    if parts[3:] == ["ready"]:
                        return self._json(200, {"ready": True})
                    if not parts[3:]:
                        outputs = endpoint.metadata[model] + endpoint.declared.get(model, [])
                        return self._json(200, {"name": model, "versions": ["1"], "platform": "onnxruntime",
                                                "inputs": [], "outputs": outputs})
                self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                model = self.path.strip("/").split("/")[2]
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outputs = endpoint.answer(model, body, int(self.headers["Inference-Header-Content-Length"]))
                with suppress(BrokenPipeError, ConnectionResetError):  # the client gave up: as it should
                    endpoint.send(self, model, endpoint.tamper(model, outputs))

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads, server.block_on_close = True, False
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=30)


def verify(export: Path, url: str, tmp_path: Path, *options: Any) -> Any:
    result = cli_in_process("verify", export, "--endpoint", url, "--json", tmp_path / "report.json", *options)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _flat_with_nan(model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    probabilities = np.full_like(outputs["probabilities"], 0.1)
    probabilities[0] = np.nan
    return {**outputs, "probabilities": probabilities}


def _one_nan(model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    probabilities = outputs["probabilities"].copy()
    probabilities[min(3, len(probabilities) - 1), 2] = np.nan
    return {**outputs, "probabilities": probabilities}


@pytest.mark.parametrize("tamper", [_flat_with_nan, _one_nan], ids=["flat-probabilities-nan-row", "one-nan"])
def test_probabilities_are_held_to_the_reference(quick_export, tmp_path, tamper):
    with FakeEndpoint(quick_export, tamper=tamper).serving() as url:
        result = verify(quick_export, url, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "endpoint parity check failed" in result.stderr and "probabilities" in result.stderr
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail)  # no NaN written
    assert not report["passed"] and not report["backends"]["lenet"]["passed"]


def _without_probabilities(model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"logits": outputs["logits"]}


def _narrow_probabilities(model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**outputs, "probabilities": outputs["probabilities"][:, :9]}


def _extra_output(model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**outputs, "embedding": np.zeros((len(outputs["logits"]), 4), dtype=np.float32)}


EMBEDDING = {"lenet": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 4]}]}


@pytest.mark.parametrize(("tamper", "declared", "message"), [
    (_without_probabilities, None, "lenet answered outputs ['logits'], expected ['logits', 'probabilities']"),
    (_narrow_probabilities, None, "lenet answered probabilities of shape [500, 9], expected [500, 10]"),
    (_extra_output, None, "lenet answered outputs ['logits', 'probabilities', 'embedding']"),
    (None, EMBEDDING, "lenet declares outputs ['logits', 'probabilities', 'embedding'] in its metadata"),
], ids=["missing", "misshapen", "extra-answered", "extra-declared"])
def test_every_output_the_model_has_must_be_the_contracts(quick_export, tmp_path, tamper, declared, message):
    with FakeEndpoint(quick_export, tamper=tamper, declared=declared).serving() as url:
        result = verify(quick_export, url, tmp_path)
    assert result.returncode == 1 and message in result.stderr, result.stdout + result.stderr


def _wrong_labels(model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if model == "lenet-image":
        return {**outputs, "label": np.array(["7"] * len(outputs["label"]), dtype=object)}
    return outputs


def test_the_image_models_labels_are_compared_too(quick_export, tmp_path):
    with FakeEndpoint(quick_export, image=True, tamper=_wrong_labels).serving() as url:
        result = verify(quick_export, url, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "lenet-image: label differs from toolkit predict's" in result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["backends"]["lenet"]["passed"]


def _send_gzip_bomb(handler: BaseHTTPRequestHandler, model: str, outputs: dict[str, np.ndarray]) -> None:
    body = gzip.compress(b" " * (64 << 20), compresslevel=9)  # 64 KB that expand to 64 MB
    handler.send_response(200)
    handler.send_header("Content-Encoding", "gzip")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _send_padded(handler: BaseHTTPRequestHandler, model: str, outputs: dict[str, np.ndarray]) -> None:
    """A correct answer in JSON, padded past 1 MB with spaces, with no Content-Length: it ends
    when the connection does (HTTP/1.0)."""
    answer = {"model_name": model, "outputs": [
        {"name": name, "datatype": "FP32", "shape": list(value.shape), "data": value.ravel().tolist()}
        for name, value in outputs.items()]}
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.end_headers()
    handler.wfile.write(json.dumps(answer).encode() + b" " * (2 << 20))


def _send_huge_length(handler: BaseHTTPRequestHandler, model: str, outputs: dict[str, np.ndarray]) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(10 << 30))
    handler.end_headers()
    handler.wfile.write(b"{}")


def _send_html(handler: BaseHTTPRequestHandler, model: str, outputs: dict[str, np.ndarray]) -> None:
    body = b"<html><body>502 Bad Gateway</body></html>"
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize(("send", "options", "message"), [
    (_send_gzip_bomb, (), "answered an infer request to lenet with Content-Encoding 'gzip'"),
    (_send_padded, ("--max-answer-mb", "1"), "answered an infer request to lenet with more than 1 MB"),
    (_send_huge_length, (), "answered an infer request to lenet with 10,737,418,240 bytes, more than 16 MB"),
    (_send_html, (), "answered an infer request to lenet with something that is not JSON"),
], ids=["gzip-bomb", "too-big-streamed", "too-big-declared", "not-json"])
def test_answers_are_bounded_in_size_and_named_for_what_is_wrong(quick_export, tmp_path, send, options, message):
    with FakeEndpoint(quick_export, send=send).serving() as url:
        result = verify(quick_export, url, tmp_path, *options)
    assert result.returncode == 1 and message in result.stderr, result.stdout + result.stderr
    assert "cannot reach" not in result.stderr


def _dribble(handler: BaseHTTPRequestHandler, head: bytes) -> None:
    handler.wfile.write(head)
    for _ in range(DRIBBLE_BYTES):
        handler.wfile.write(b"a")
        handler.wfile.flush()
        time.sleep(1)


def _send_headers_slowly(handler: BaseHTTPRequestHandler, model: str, outputs: dict[str, np.ndarray]) -> None:
    _dribble(handler, b"HTTP/1.1 200 OK\r\nX-Slowly: ")


def _send_body_slowly(handler: BaseHTTPRequestHandler, model: str, outputs: dict[str, np.ndarray]) -> None:
    _dribble(handler, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")


@pytest.mark.parametrize("send", [_send_headers_slowly, _send_body_slowly], ids=["headers", "body"])
def test_a_slow_endpoint_meets_the_deadline(quick_export, tmp_path, send):
    """One byte a second keeps every read alive; the deadline still ends the check (the
    process is given far less than the endpoint's DRIBBLE_BYTES seconds)."""
    with FakeEndpoint(quick_export, send=send).serving() as url:
        result = run_cli("verify", quick_export, "--endpoint", url, "--json", tmp_path / "r.json",
                         "--deadline", "3", timeout=DRIBBLE_BYTES / 2)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "did not finish answering an infer request to lenet within the 3 s" in result.stderr


def _send_hostile_error(handler: BaseHTTPRequestHandler, model: str, outputs: dict[str, np.ndarray]) -> None:
    """A refusal whose text would clear the screen, break rich's markup and scroll for pages."""
    body = json.dumps({"error": "bad\n[/]\x1b[2J\x1b[31mred\r\n" + "x" * (3 << 20)}).encode()
    handler.send_response(400)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_what_an_endpoint_says_is_quoted_as_one_printable_line(quick_export, tmp_path):
    with FakeEndpoint(quick_export, send=_send_hostile_error).serving() as url:
        result = verify(quick_export, url, tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "refused an infer request to lenet: HTTP 400: bad [/]\\x1b[2J" in line
    assert "\x1b" not in line and len(line) < 2200 and line.endswith("more characters)")
