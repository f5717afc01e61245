"""`toolkit serve` under attack: requests whose cheapest facts (declared shapes, counts, sizes)
must refuse them before any per-element work, headers that never end or never arrive, bytes
that are not a gRPC request. A health check must answer meanwhile: the attacks share the one
event loop with it."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from toolkit.serving.launch import free_port, server_process
from toolkit.serving.options import HEADER_TIMEOUT_S, MAX_HEADER_BYTES  # imports no KServe (its protos clash)


@pytest.fixture(scope="module")
def server(quick_export, tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve-limits") / "server.log"
    args = ["toolkit", "serve", str(quick_export), "--port", str(port), "--grpc-port", str(grpc_port),
            "--provider", "cpu"]
    with log.open("w") as stderr, server_process(args, ready_url=f"http://127.0.0.1:{port}/v2/health/ready",
                                                 stderr=stderr):
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "grpc": f"127.0.0.1:{grpc_port}", "log": log}


def _health_answers_while(url, attack):
    """`attack()`'s result, with the server's health asked again and again while it runs: each
    must answer within 1 s (a deadline on the wait: the attack's work must not hold the loop)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(attack)
        while not running.done():
            assert httpx.get(f"{url}/v2/health/live", timeout=1).status_code == 200
        return running.result()


def _empty_bytes_elements(megabytes):
    count = megabytes * 2**20 // 4
    return count, bytes(4 * count)  # each element a 4-byte length of 0


@pytest.mark.parametrize(("model", "refusal"), [("lenet-image", "N from 1 to 64"), ("lenet", "must be FP32")])
def test_millions_of_binary_bytes_elements_are_refused_by_their_declared_shape(server, model, refusal):
    count, payload = _empty_bytes_elements(8)  # checking each element took the loop ~4 s
    header = json.dumps({"inputs": [{"name": "image", "shape": [count], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(payload)}}]}).encode()
    response = _health_answers_while(server["url"], lambda: httpx.post(
        f"{server['url']}/v2/models/{model}/infer", content=header + payload, timeout=60,
        headers={"Inference-Header-Content-Length": str(len(header))}))
    assert response.status_code == 400 and refusal in response.json()["error"]


def test_millions_of_grpc_bytes_elements_are_refused_by_their_declared_shape(server):
    count, payload = _empty_bytes_elements(16)
    request = service_pb2.ModelInferRequest(model_name="lenet-image", raw_input_contents=[payload])
    request.inputs.add(name="image", datatype="BYTES", shape=[count])

    def attack():
        with grpc.insecure_channel(server["grpc"]) as channel, pytest.raises(grpc.RpcError) as refused:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        return refused.value

    refused = _health_answers_while(server["url"], attack)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "N from 1 to 64" in refused.details()


def test_grpc_contents_are_counted_against_the_shape_before_they_are_read(server):
    request = service_pb2.ModelInferRequest(model_name="lenet")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28]).contents.fp32_contents.extend(
        [0.5] * 785)
    with grpc.insecure_channel(server["grpc"]) as channel, pytest.raises(grpc.RpcError) as refused:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "785 values do not fill shape [1, 1, 28, 28]" in refused.value.details()


def _json_numbers(count, shape=(1, 1, 28, 28)):
    return (b'{"inputs":[{"name":"image","shape":%s,"datatype":"FP32","data":[' % json.dumps(list(shape)).encode()
            + b",".join([b"0"] * count) + b"]}]}")


def test_a_json_body_with_more_values_than_the_model_takes_is_refused_unparsed(server):
    body = _json_numbers(4_000_000)  # 8 MB: more than 4,096 images' worth of values
    response = httpx.post(f"{server['url']}/v2/models/lenet/infer", content=body, timeout=60)
    assert response.status_code == 400 and "counted by their commas" in response.json()["error"]


@pytest.mark.slow
def test_a_json_body_at_the_cap_leaves_health_answering(server):
    # 64 MB of numbers declared as one image: parsing it held the loop 3.3 s. Below the count
    # bound (a full request of 4,096 images), the parse itself runs off the loop.
    for body in (_json_numbers(32 * 2**20 - 64), _json_numbers(4096 * 784 - 1, shape=(4096, 1, 28, 28))):
        response = _health_answers_while(server["url"], lambda body=body: httpx.post(
            f"{server['url']}/v2/models/lenet/infer", content=body, timeout=120))
        assert response.status_code == 400, response.text


def _send_slowly(port, head, chunk=64 * 1024):
    """A connection that sent `head` (without ending it) in chunks, and what came back."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            for start in range(0, len(head), chunk):
                sock.sendall(head[start:start + chunk])
        except OSError:  # the server answered and closed while this was still sending
            pass
        sock.settimeout(30)
        return _until_closed(sock)


def _until_closed(sock):
    """Everything the server sends until it closes the connection (a timeout fails the test):
    an answer's head and body may come in separate reads."""
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except ConnectionResetError:  # closed with bytes of ours unread: a reset, after the answer
        pass
    return answer


def test_headers_over_the_limit_get_a_431_before_they_end(server):
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * (16 * MAX_HEADER_BYTES)
    answer = _send_slowly(server["port"], head)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"connection: close" in answer and b'"error"' in answer


def test_slow_headers_get_a_408_and_leave_the_server_answering(server):
    connections = []
    try:
        for _ in range(300):
            connections.append(socket.create_connection(("127.0.0.1", server["port"])))
            connections[-1].sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # and never the end
        idle = socket.create_connection(("127.0.0.1", server["port"]))  # sends nothing at all
        connections.append(idle)
        started = time.monotonic()
        assert httpx.get(f"{server['url']}/v2/health/live", timeout=1).status_code == 200
        for sock in connections:
            sock.settimeout(HEADER_TIMEOUT_S + 20 - (time.monotonic() - started))
        answers = [sock.recv(4096) for sock in connections]
    finally:
        for sock in connections:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers[:-1]), answers[0]
    assert answers[-1] == b""  # closed: there was no request to answer
    assert httpx.get(f"{server['url']}/v2/health/live", timeout=1).status_code == 200


def test_a_trailing_slash_is_a_404_not_a_redirect_built_from_the_host_header(server):
    response = httpx.get(f"{server['url']}/v2/health/ready/", headers={"Host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["error"]


def _model_infer(grpc_address, data):
    """ModelInfer called with `data` as the request's bytes; the status code it ended with."""
    with grpc.insecure_channel(grpc_address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        try:
            call(data, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""


def test_bytes_that_are_not_a_grpc_request_are_invalid_argument_without_a_traceback(server):
    code, details = _model_infer(server["grpc"], b"\xff\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a ModelInferRequest" in details
    assert "Traceback" not in server["log"].read_text()


_VALID = service_pb2.ModelInferRequest(model_name="lenet", raw_input_contents=[bytes(3136)])
_VALID.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
_REFUSALS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.UNIMPLEMENTED}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.builds(
    lambda raw, at, junk: raw[:at] + junk + raw[at + len(junk):],
    st.just(_VALID.SerializeToString()), st.integers(0, 100), st.binary(min_size=1, max_size=8))))
def test_fuzzed_grpc_requests_are_answered_or_refused_never_a_server_error(server, data):
    code, details = _model_infer(server["grpc"], data)
    assert code in _REFUSALS, (code, details, data)


def _image_with(outputs=(), name="image", shape=(1, 1, 28, 28)):
    """A JSON infer request for one image, as a dict: input `name` of `shape`, naming `outputs`."""
    request = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(shape), "data": [0] * 784}]}
    return {**request, "outputs": [{"name": output} for output in outputs]} if outputs else request


def _binary_request(header):
    """A request in the binary extension's framing holding only its JSON `header`."""
    encoded = json.dumps(header).encode()
    return {"content": encoded, "headers": {"Inference-Header-Content-Length": str(len(encoded))}}


@pytest.mark.parametrize("framing", ["json", "binary"])
def test_a_request_naming_many_outputs_is_refused_by_their_count_with_a_short_error(server, framing):
    # 3 million output names held the loop 30 s and came back as a 24 MB error.
    header = _image_with(outputs=["logits"] * 100_000)
    request = {"json": header} if framing == "json" else _binary_request(header)
    response = _health_answers_while(server["url"], lambda: httpx.post(
        f"{server['url']}/v2/models/lenet/infer", timeout=60, **request))
    assert response.status_code == 400 and len(response.content) < 1000, response.content[:300]


@pytest.mark.parametrize("many", ["inputs", "outputs"])
def test_grpc_naming_many_inputs_or_outputs_is_invalid_argument_with_a_short_error(server, many):
    # 3 million inputs held the loop 8 s; 3 million output names overflowed the status trailer.
    request = service_pb2.ModelInferRequest(model_name="lenet", raw_input_contents=[bytes(3136)])
    request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
    for _ in range(300_000):
        getattr(request, many).add(name="image")
    with grpc.insecure_channel(server["grpc"]) as channel, pytest.raises(grpc.RpcError) as refused:
        _health_answers_while(server["url"], lambda: service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(refused.value.details()) < 1000


def test_a_binary_requests_json_header_is_capped_before_it_is_parsed(server):
    # Tensor data belongs in the binary part: a 67 MB header of JSON numbers held the loop 3 s.
    header = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [4096, 1, 28, 28],
                          "data": [0] * 4096 * 784}]}
    response = _health_answers_while(server["url"], lambda: httpx.post(
        f"{server['url']}/v2/models/lenet/infer", timeout=60, **_binary_request(header)))
    assert response.status_code == 400 and "JSON header" in response.json()["error"], response.text[:300]


def test_a_get_with_a_trickled_body_is_refused_and_closed(server):
    with socket.create_connection(("127.0.0.1", server["port"])) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        sock.settimeout(30)
        answer = _until_closed(sock)
        # Answered and closed: the rest of the body is never read.
        assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer, answer
        assert answer.endswith(b"takes no body\"}"), answer


@pytest.mark.parametrize("method", ["ModelMetadata", "ModelReady", "ServerLive", "ServerMetadata", "ServerReady"])
def test_bytes_that_are_not_a_request_are_invalid_argument_for_every_grpc_method(server, method):
    with grpc.insecure_channel(server["grpc"]) as channel, pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=lambda raw: raw,
                            response_deserializer=lambda raw: raw)(b"\xff\xff\xff\xff", timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in server["log"].read_text()


@pytest.mark.parametrize("request_json", [
    _image_with(name="A" * 2**20), _image_with(outputs=["A" * 2**20]), _image_with(shape=[1] * 300_000)],
    ids=["input name", "output name", "shape"])
def test_error_messages_quote_the_request_truncated(server, request_json):
    response = httpx.post(f"{server['url']}/v2/models/lenet/infer", json=request_json, timeout=60)
    assert response.status_code == 400 and len(response.content) < 1000, response.content[:300]


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "ModelReady"])
def test_a_grpc_model_name_not_served_is_quoted_truncated(server, method):
    request = (service_pb2.ModelInferRequest(model_name="A" * 2**20) if method == "ModelInfer"
               else getattr(service_pb2, f"{method}Request")(name="A" * 2**20))
    with grpc.insecure_channel(server["grpc"]) as channel, pytest.raises(grpc.RpcError) as refused:
        getattr(service_pb2_grpc.GRPCInferenceServiceStub(channel), method)(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and len(refused.value.details()) < 1000
