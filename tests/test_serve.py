"""`toolkit serve` as a user runs it: a real server subprocess, `tritonclient` as the client for
the tensor model, plain HTTP for the image model and for requests no client would send."""

import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import run_cli
from toolkit.core.locate import EXAMPLES_DIR
from toolkit.runtime.inference import classify
from toolkit.runtime.predictor import Predictor
from toolkit.serving.launch import answers_200, free_port, toolkit_server

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))


@pytest.fixture(scope="module")
def served(quick_export):
    port, grpc_port = free_port(), free_port()
    args = ["serve", str(quick_export), "--port", str(port), "--grpc-port", str(grpc_port), "--provider", "cpu"]
    with toolkit_server(args, ready_url=f"http://127.0.0.1:{port}/v2/health/ready") as process:
        yield {"url": f"http://127.0.0.1:{port}", "host": f"127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}",
               "pid": process.pid}


@pytest.fixture(scope="module")
def local(quick_export):
    return Predictor(quick_export, provider="cpu")


def _images(count, seed=0):
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)


def _infer(host, images, *, binary):
    client = httpclient.InferenceServerClient(host)
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")]
    result = client.infer("lenet", [tensor], outputs=outputs)
    return result.as_numpy("logits"), result.as_numpy("probabilities")


def _metrics(url):
    """Every sample on /metrics, keyed by (name, sorted labels)."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families for sample in family.samples}


def test_health_metadata_and_the_exported_contract(served, local):
    assert httpclient.InferenceServerClient(served["host"]).is_server_ready()
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/lenet/ready", "/v2/models/lenet-image/ready"):
        assert httpx.get(served["url"] + path).status_code == 200, path
    metadata = httpx.get(f"{served['url']}/v2/models/lenet").json()
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("logits", "FP32", [-1, 10]), ("probabilities", "FP32", [-1, 10])]
    parameters = metadata["parameters"]
    assert parameters["class_names"] == local.class_names and parameters["dataset"] == "mnist"
    assert parameters["checkpoint_sha256"] == local.metadata["source_checkpoint_sha256"]
    assert parameters["integrity"].startswith("verified") and parameters["provider"] == "cpu"
    assert parameters["normalization_in_graph"] == local.metadata["normalization_baked_in"]
    assert httpx.get(f"{served['url']}/v2/models/nothing").status_code == 404


def test_the_server_listens_on_loopback_only_by_default(served):
    process = psutil.Process(served["pid"])
    connections = getattr(process, "net_connections", None) or process.connections  # psutil 6 renamed it
    listening = [c.laddr for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip in ("127.0.0.1", "::ffff:127.0.0.1") for address in listening), listening


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tensor_answers_match_onnxruntime_in_process(served, local, binary):
    images = _images(7, seed=int(binary))
    logits, probabilities = _infer(served["host"], images, binary=binary)
    want_logits, want_probabilities = local.run(images)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(probabilities, want_probabilities, atol=1e-6)


def test_grpc_answers_as_rest_does(served, local):
    images = _images(3, seed=5)
    client = grpcclient.InferenceServerClient(served["grpc"])
    tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    before = _metrics(served["url"])
    result = client.infer("lenet", [tensor])
    np.testing.assert_allclose(result.as_numpy("logits"), local.run(images)[0], atol=1e-5, rtol=1e-5)
    only = client.infer("lenet", [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    assert [output.name for output in only.get_response().outputs] == ["probabilities"]
    np.testing.assert_allclose(only.as_numpy("probabilities"), local.run(images)[1], atol=1e-6)
    wrong = grpcclient.InferInput("image", [1, 28, 28], "FP32")
    wrong.set_data_from_numpy(images[0])
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("lenet", [wrong])
    after = _metrics(served["url"])
    for status, calls in (("OK", 2), ("INVALID_ARGUMENT", 1)):  # gRPC calls are counted as REST ones are
        key = ("toolkit_requests_total", (("model", "lenet"), ("protocol", "grpc"), ("status", status)))
        assert after[key] - before.get(key, 0) == calls, status


def test_grpc_refuses_what_rest_refuses(served):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    images = _images(1)
    client = grpcclient.InferenceServerClient(served["grpc"])
    tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    with pytest.raises(InferenceServerException, match=r"UNIMPLEMENTED.*version"):
        client.infer("lenet", [tensor], model_version="2")
    with pytest.raises(InferenceServerException, match=r"UNIMPLEMENTED.*version"):
        client.get_model_metadata("lenet", model_version="2")
    with pytest.raises(InferenceServerException, match=r"INVALID_ARGUMENT.*softmax"):
        client.infer("lenet", [tensor], outputs=[grpcclient.InferRequestedOutput("softmax")])
    cut_short = service_pb2.ModelInferRequest(model_name="lenet-image", raw_input_contents=[b"\x10\0\0\0abc"])
    cut_short.inputs.add(name="image", datatype="BYTES", shape=[1])
    with grpc.insecure_channel(served["grpc"]) as channel, pytest.raises(grpc.RpcError) as refused:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(cut_short)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8 elements" in refused.value.details()


def test_a_request_without_an_id_is_answered_and_an_id_is_echoed(served):
    body = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    anonymous = httpx.post(f"{served['url']}/v2/models/lenet/infer", json=body)
    assert anonymous.status_code == 200 and anonymous.json()["id"]
    named = httpx.post(f"{served['url']}/v2/models/lenet/infer", json={"id": "req-42", **body})
    assert named.status_code == 200 and named.json()["id"] == "req-42"


def test_two_hundred_concurrent_requests_each_get_their_own_answer(served, local):
    requests = [_images(1 + i % 3, seed=100 + i) for i in range(200)]
    before = _metrics(served["url"])
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda images: _infer(served["host"], images, binary=True), requests))
    for images, (logits, _) in zip(requests, answers, strict=True):
        np.testing.assert_allclose(logits, local.run(images)[0], atol=1e-5, rtol=1e-5)
    after = _metrics(served["url"])
    runs = after[("toolkit_batch_requests_count", ())] - before[("toolkit_batch_requests_count", ())]
    merged = after[("toolkit_batch_requests_sum", ())] - before[("toolkit_batch_requests_sum", ())]
    assert merged == 200 and runs < 200  # some requests shared a run


def test_image_requests_answer_as_toolkit_predict_does(served, local):
    buffer = io.BytesIO()
    Image.new("L", (60, 60), 255).save(buffer, "PNG")  # a page with nothing drawn on it
    files = [*(path.read_bytes() for path in EXAMPLES[:6]), buffer.getvalue()]
    body = {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                        "data": [base64.b64encode(f).decode() for f in files]}]}
    response = httpx.post(f"{served['url']}/v2/models/lenet-image/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    expected = [classify(local, path) for path in EXAMPLES[:6]]
    assert outputs["label"]["data"] == [e.label for e in expected] + [""]  # nothing drawn: no label
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(len(files), 10)
    np.testing.assert_allclose(probabilities[:6].max(axis=1), [e.probability for e in expected], atol=1e-6)
    assert not probabilities[6].any()


def test_image_requests_in_the_binary_extension(served):
    client = httpclient.InferenceServerClient(served["host"])
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(p.read_bytes()) for p in EXAMPLES[:2]], dtype=object))
    labels = client.infer("lenet-image", [tensor]).as_numpy("label")
    assert [label.decode() for label in labels] == [p.stem.rsplit("-", 1)[1] for p in EXAMPLES[:2]]


def _tensor(**change):
    tensor = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}
    return {"inputs": [{**tensor, **change}]}


def _binary(header, payload, length=None):
    header = json.dumps(header).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header) if length is None else length)}


_GOOD_HEADER = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32",
                            "parameters": {"binary_data_size": 3136}}]}
MALFORMED = {
    "not json": (b"{this is not json", {"Content-Type": "application/json"}),
    "truncated json": (json.dumps(_tensor()).encode()[:500], {"Content-Type": "application/json"}),
    "no inputs": (json.dumps({"inputs": []}).encode(), {}),
    "wrong input name": (json.dumps(_tensor(name="pixels")).encode(), {}),
    "extra input": (json.dumps({"inputs": _tensor()["inputs"] * 2}).encode(), {}),
    "wrong datatype": (json.dumps(_tensor(datatype="INT64", data=[0] * 784)).encode(), {}),
    "unknown datatype": (json.dumps(_tensor(datatype="FOO")).encode(), {}),
    "wrong shape": (json.dumps(_tensor(shape=[1, 28, 28])).encode(), {}),
    "data does not fit shape": (json.dumps(_tensor(data=[0.5] * 700)).encode(), {}),
    "strings as pixels": (json.dumps(_tensor(data=["a"] * 784)).encode(), {}),
    "numbers as strings": (json.dumps(_tensor(data=["0.5"] * 784)).encode(), {}),
    "booleans as pixels": (json.dumps(_tensor(data=[True] * 784)).encode(), {}),
    "nulls as pixels": (json.dumps(_tensor(data=[None] * 784)).encode(), {}),
    "ragged nested data": (json.dumps(_tensor(data=[[0.5] * 783, [0.5]])).encode(), {}),
    "nan pixels": (json.dumps(_tensor(data=["NaN"] * 784)).encode(), {}),
    "too many images": (json.dumps(_tensor(shape=[5000, 1, 28, 28], data=[0.0] * 784)).encode(), {}),
    "binary header not a number": _binary(_GOOD_HEADER, bytes(3136), length="x12"),
    "binary header too long": _binary(_GOOD_HEADER, bytes(3136), length=999_999),
    "binary header not json": (b"!" * 40 + bytes(3136), {"Inference-Header-Content-Length": "40"}),
    "binary data too short": _binary(_GOOD_HEADER, bytes(3000)),
    "binary size does not fit shape": _binary(
        {"inputs": [{**_GOOD_HEADER["inputs"][0], "parameters": {"binary_data_size": 3000}}]}, bytes(3000)),
    "binary header without inputs": _binary({"id": "x"}, bytes(3136)),
    # Found by a hostile probe.
    "numbers beyond float": (json.dumps(_tensor(data=[10**400] * 784)).encode(), {}),
    "binary parameters not an object": _binary(
        {"inputs": [{**_GOOD_HEADER["inputs"][0], "parameters": [1]}]}, bytes(3136)),
    "shape of booleans": (json.dumps(_tensor(shape=[True, 1, 28, 28])).encode(), {}),
    "binary shape of booleans": _binary(
        {"inputs": [{**_GOOD_HEADER["inputs"][0], "shape": [True, 1, 28, 28]}]}, bytes(3136)),
    "binary header input without datatype": _binary(
        {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "data": [0.5] * 784}]}, b""),
    "binary header with a numeric id": _binary({**_GOOD_HEADER, "id": 5}, bytes(3136)),
    "binary header with parameters not an object": _binary({**_GOOD_HEADER, "parameters": [1]}, bytes(3136)),
    "binary header with outputs as a string": _binary({**_GOOD_HEADER, "outputs": "logits"}, bytes(3136)),
    "binary header nested too deeply": (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b',"inputs":[]}',
                                        {"Inference-Header-Content-Length": str(200_018)}),
    "pixels of 0..255": (json.dumps(_tensor(data=[255.0] * 784)).encode(), {}),
    "pixels near float's limit": (json.dumps(_tensor(data=[3e38] * 784)).encode(), {}),
    "binary_data_output not a boolean": (json.dumps({**_tensor(), "parameters": {"binary_data_output": "no"}}).encode(),
                                         {}),
    "binary_data of an output not a boolean": _binary(
        {**_GOOD_HEADER, "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]}, bytes(3136)),
    "an output the model lacks": (json.dumps({**_tensor(), "outputs": [{"name": "softmax"}]}).encode(), {}),
    "an output asked for twice": (json.dumps({**_tensor(), "outputs": [{"name": "logits"}] * 2}).encode(), {}),
    # Which would be read? KServe's REST side read one silently; gRPC refuses both at once.
    "data beside binary_data_size": _binary(
        {"inputs": [{**_GOOD_HEADER["inputs"][0], "data": [0.5] * 784}]}, bytes(3136)),
    "binary_data_size in a JSON request": (json.dumps(_tensor(parameters={"binary_data_size": 3136})).encode(), {}),
    "binary BOOL tensor": _binary(
        {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "BOOL",
                     "parameters": {"binary_data_size": 784}}]}, bytes(784)),
}


def test_the_binary_header_sent_twice_gets_a_400(served):
    header = json.dumps(_GOOD_HEADER).encode()
    headers = [("Inference-Header-Content-Length", "5"), ("Inference-Header-Content-Length", str(len(header)))]
    response = httpx.post(f"{served['url']}/v2/models/lenet/infer", content=header + bytes(3136), headers=headers)
    assert response.status_code == 400 and "more than once" in response.json()["error"]


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_tensor_requests_get_a_400_that_says_why(served, case):
    body, headers = MALFORMED[case]
    response = httpx.post(f"{served['url']}/v2/models/lenet/infer", content=body, headers=headers)
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.json()["error"].strip()
    assert _infer(served["host"], _images(1), binary=True)[0].shape == (1, 10)  # and the server goes on


IMAGE_MALFORMED = {
    "not base64": ["this is not base64!"],
    "base64 of text": [base64.b64encode(b"hello, not an image").decode()],
    "truncated png": [base64.b64encode(EXAMPLES[0].read_bytes()[:60]).decode()],
}


@pytest.mark.parametrize("case", IMAGE_MALFORMED, ids=list(IMAGE_MALFORMED))
def test_undecodable_images_get_a_400_that_says_why(served, case):
    data = IMAGE_MALFORMED[case]
    body = {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}]}
    response = httpx.post(f"{served['url']}/v2/models/lenet-image/infer", json=body)
    assert response.status_code == 400, (response.status_code, response.text)
    assert "image" in response.json()["error"]


def test_raw_image_bytes_in_the_binary_extension_get_a_400(served):
    client = httpclient.InferenceServerClient(served["host"])
    tensor = httpclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([EXAMPLES[0].read_bytes()], dtype=object))
    with pytest.raises(InferenceServerException, match=r"\[400\].*base64"):
        client.infer("lenet-image", [tensor])


def test_a_body_over_the_cap_is_refused_unread(served):
    response = httpx.post(f"{served['url']}/v2/models/lenet/infer", content=bytes(65 * 1024 * 1024),
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "exceeds" in response.json()["error"]
    assert response.headers["connection"] == "close"  # what follows on it is the unread body, not a request


def test_metrics_count_requests_by_model_and_status_and_time_them(served):
    httpx.post(f"{served['url']}/v2/models/lenet/infer", content=b"{", headers={"Content-Type": "application/json"})
    _infer(served["host"], _images(2), binary=False)
    metrics = _metrics(served["url"])
    assert metrics[("toolkit_requests_total", (("model", "lenet"), ("protocol", "rest"), ("status", "200")))] >= 1
    assert metrics[("toolkit_requests_total", (("model", "lenet"), ("protocol", "rest"), ("status", "400")))] >= 1
    assert metrics[("toolkit_request_seconds_count", (("model", "lenet"), ("protocol", "rest")))] >= 2
    assert metrics[("toolkit_batch_images_count", ())] >= 1


def test_a_taken_port_is_one_clear_line(quick_export):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", quick_export, "--port", port, "--provider", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_taken_by_a_server_still_loading_is_refused(quick_export, workers):
    port = free_port()
    args = [sys.executable, "-m", "toolkit", "serve", str(quick_export), "--port", str(port), "--provider", "cpu",
            "--workers", str(workers)]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # Once it has a socket on the port, long before its model has loaded and it answers:
        # a bound socket that does not listen yet would let the second server bind too.
        while not any(c.laddr and c.laddr.port == port for c in psutil.Process(first.pid).connections("tcp")):
            assert first.poll() is None and time.monotonic() < deadline, "the first server never took its port"
            time.sleep(0.02)
        second = run_cli("serve", quick_export, "--port", port, "--provider", "cpu", "--workers", workers)
        assert second.returncode == 1, second.stdout
        assert second.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    finally:
        first.terminate()
        first.wait(timeout=60)


@pytest.mark.faults
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_requests_in_flight_finish_then_exits_0(quick_export, workers):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A long batching delay keeps requests inside the server while the signal arrives.
    args = [sys.executable, "-m", "toolkit", "serve", str(quick_export), "--port", str(port), "--workers", str(workers),
            "--provider", "cpu", "--max-batch-delay-ms", "1000", "--max-batch-size", "4096"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not answers_200(f"{url}/v2/health/ready"):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
        children = psutil.Process(process.pid).children()
        answers = []

        def one() -> None:
            with httpx.Client(timeout=60) as client:  # a connection each: with workers, spread over them
                answers.append(client.post(f"{url}/v2/models/lenet/infer", json=_tensor()).status_code)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        # In flight: summed over the workers, if there are several.
        while _metrics(url).get(("toolkit_requests_in_flight", (("model", "lenet"), ("protocol", "rest"))), 0) < 8:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert process.wait(timeout=60) == 0, process.stderr.read()
        assert answers == [200] * 8
        assert not psutil.wait_procs(children, timeout=30)[1]  # no worker (nor helper process) left behind
    finally:
        if process.poll() is None:
            process.kill()


def test_verify_endpoint_passes_against_the_server_and_writes_its_report(served, quick_export, tmp_path):
    report = tmp_path / "endpoint-parity.json"
    result = run_cli("verify", quick_export, "--endpoint", served["url"], "--json", report)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["passed"] and data["endpoint"] == served["url"] and data["model"] == "lenet"
    assert set(data["backends"]) == {"lenet", "lenet-image"} and data["samples"] > 10_000
    assert all(b["top1_agreement"] == 1.0 and b["passed"] for b in data["backends"].values())


@pytest.mark.slow
def test_verify_endpoint_fails_against_a_server_serving_another_model(quick_export, tmp_path, mnist_dir):
    other = tmp_path / "other"
    assert run_cli("train", "lenet", "--epochs", "1", "--limit-train", "2000", "--seed", "1", "--runs-dir", tmp_path,
                   "--name", "other", "--data-dir", mnist_dir, "--device", "cpu").returncode == 0
    assert run_cli("export", other / "best.pt", "--out", tmp_path / "exports" / "other", "--no-verify").returncode == 0
    port = free_port()
    args = ["serve", str(tmp_path / "exports" / "other"), "--name", "lenet", "--port", str(port), "--provider", "cpu"]
    with toolkit_server(args, ready_url=f"http://127.0.0.1:{port}/v2/health/ready"):
        result = run_cli("verify", quick_export, "--endpoint", f"127.0.0.1:{port}", "--json", tmp_path / "r.json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "endpoint parity check failed" in result.stderr and "sample" in result.stderr
    assert "the endpoint serves checkpoint" in result.stderr
    assert not json.loads((tmp_path / "r.json").read_text())["passed"]


def test_the_readme_client_example_runs_against_the_server(served):
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    code = re.search(r"### `toolkit serve.*?```python\n(.*?)```", readme, re.S).group(1)
    assert '"127.0.0.1:8080"' in code
    code = code.replace('"127.0.0.1:8080"', repr(served["host"]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().strip("[]").split()) == 4  # one class per image


def test_clients_cannot_unload_the_served_model(served):
    for action in ("unload", "load"):
        response = httpx.post(f"{served['url']}/v2/repository/models/lenet/{action}")
        assert response.status_code == 501, response.text
    with pytest.raises(InferenceServerException, match=r"StatusCode\.UNIMPLEMENTED"):
        grpcclient.InferenceServerClient(served["grpc"]).unload_model("lenet")
    assert httpx.get(f"{served['url']}/v2/models/lenet/ready").status_code == 200
    assert _infer(served["host"], _images(1), binary=True)[0].shape == (1, 10)


def test_binary_bytes_whose_count_does_not_fit_the_shape_get_a_400(served):
    element = base64.b64encode(EXAMPLES[0].read_bytes())
    payload = len(element).to_bytes(4, "little") + element
    header = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(payload)}}]}
    body, headers = _binary(header, payload)
    response = httpx.post(f"{served['url']}/v2/models/lenet-image/infer", content=body, headers=headers)
    assert response.status_code == 400 and "2 whole UTF-8 elements" in response.json()["error"]


def test_names_in_urls_create_no_metrics_and_other_routes_are_not_served(served):
    for index in range(20):
        assert httpx.post(f"{served['url']}/v2/models/junk{index}/infer", json=_tensor()).status_code == 404
    metrics = _metrics(served["url"])
    assert not any("junk" in str(key) for key in metrics)
    assert metrics[("toolkit_requests_total", (("model", "unknown"), ("protocol", "rest"), ("status", "404")))] >= 20
    for path in ("/v1/models/lenet:predict", "/openapi.json", "/docs"):
        response = httpx.request("POST" if "predict" in path else "GET", served["url"] + path, json={})
        assert response.status_code == 404 and "v2 protocol" in response.json()["error"], path


def test_an_image_request_over_the_pixel_budget_is_refused_before_decoding(served):
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000), 255).save(buffer, "PNG")  # 36 Mpx each, a few KB compressed
    data = [base64.b64encode(buffer.getvalue()).decode()] * 2
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": data}]}
    response = httpx.post(f"{served['url']}/v2/models/lenet-image/infer", json=body, timeout=60)
    assert response.status_code == 400 and "72,000,000 pixels" in response.json()["error"]


def test_refusals_log_no_traceback():
    # In a fresh interpreter: KServe's gRPC protos and tritonclient's cannot be loaded in one.
    check = """
import logging
from kserve.errors import InvalidInput
from toolkit.serving.oip import NotOffered
from toolkit.serving.server import ExpectedTracebacks

def record(exc):
    return logging.LogRecord("kserve", logging.ERROR, "x", 1, "Exception:", (), (type(exc), exc, None))

refusals = ExpectedTracebacks()
assert not refusals.filter(record(InvalidInput("bad shape")))
assert not refusals.filter(record(NotOffered("model versions")))  # a call this server does not offer
assert refusals.filter(record(RuntimeError("a server error")))  # keeps its traceback
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_error_is_the_protocols_error_body(served):
    url = served["url"]
    answers = {
        405: httpx.get(f"{url}/v2/models/lenet/infer"),
        404: httpx.get(f"{url}/v2/no/such/route"),
        501: httpx.post(f"{url}/v2/models/lenet/versions/2/infer", json=_tensor()),
    }
    unknown = httpx.post(f"{url}/v2/models/lenet-typo/infer", json={})  # the model, before the body
    assert unknown.status_code == 404 and "serves lenet, lenet-image" in unknown.json()["error"]
    for status, response in answers.items():
        assert response.status_code == status and response.json()["error"].strip(), (status, response.text)


def _slow_image_files():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2000, 2000), dtype=np.uint8)).save(buffer, "PNG")
    return [buffer.getvalue()] * 12  # seconds of decoding and framing


def _wait_for_count(url, key):
    deadline = time.monotonic() + 60
    while _metrics(url).get(key, 0) < 1:  # counted once the run it left behind ends
        assert time.monotonic() < deadline, f"never counted: {key}"
        time.sleep(0.2)


def test_a_client_that_leaves_while_the_model_runs_is_counted_as_gone(served):
    data = [base64.b64encode(file).decode() for file in _slow_image_files()]
    body = {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}]}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{served['url']}/v2/models/lenet-image/infer", json=body, timeout=httpx.Timeout(5, read=0.3))
    _wait_for_count(served["url"], ("toolkit_requests_total",
                                    (("model", "lenet-image"), ("protocol", "rest"), ("status", "499"))))
    assert _infer(served["host"], _images(1), binary=True)[0].shape == (1, 10)


def test_a_grpc_call_past_its_deadline_is_counted_so(served):
    files = np.array([base64.b64encode(file) for file in _slow_image_files()], dtype=object)
    tensor = grpcclient.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(files)
    busy = ("toolkit_requests_in_flight", (("model", "lenet-image"), ("protocol", "rest")))
    while _metrics(served["url"]).get(busy, 0):  # the call must reach a model that is free to start it
        time.sleep(0.2)
    with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
        grpcclient.InferenceServerClient(served["grpc"]).infer("lenet-image", [tensor], client_timeout=1.0)
    _wait_for_count(served["url"], ("toolkit_requests_total",
                                    (("model", "lenet-image"), ("protocol", "grpc"), ("status", "DEADLINE_EXCEEDED"))))
