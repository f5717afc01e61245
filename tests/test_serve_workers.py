"""`toolkit serve --workers N`: processes sharing one port, with metrics summed over all of them."""

import asyncio
import contextlib
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_cli
from toolkit.runtime.predictor import Predictor
from toolkit.serving.launch import free_port, toolkit_server

OK = ("toolkit_requests_total", (("model", "lenet"), ("protocol", "rest"), ("status", "200")))


def _workers(pid):
    """The worker processes serving now (not the resource tracker, not one dead and unreaped)."""
    alive = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and any("spawn_main" in part for part in child.cmdline()):
                alive.append(child)
    return alive


def _metrics(url):
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families for sample in family.samples}


def _body(images):
    return {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.ravel().tolist()}]}


@pytest.fixture(scope="module")
def pool(quick_export):
    port, grpc_port = free_port(), free_port()
    args = ["serve", str(quick_export), "--port", str(port), "--grpc-port", str(grpc_port), "--provider", "cpu",
            "--workers", "2"]
    with toolkit_server(args, ready_url=f"http://127.0.0.1:{port}/v2/health/ready",
                        ready_line="2 worker processes") as process:
        yield {"url": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}", "pid": process.pid}


def test_workers_answer_on_one_port_and_every_request_is_counted_once(pool, quick_export):
    assert len(_workers(pool["pid"])) == 2
    images = np.random.default_rng(3).random((40, 1, 28, 28), dtype=np.float32)
    expected = Predictor(quick_export, provider="cpu").run(images)[1]
    before = _metrics(pool["url"]).get(OK, 0)

    def one(index):  # a connection each, so the kernel spreads them over the workers
        with httpx.Client() as client:
            answer = client.post(f"{pool['url']}/v2/models/lenet/infer", json=_body(images[index:index + 1]))
        return np.array(answer.json()["outputs"][1]["data"])

    with ThreadPoolExecutor(8) as threads:
        answers = list(threads.map(one, range(len(images))))
    np.testing.assert_allclose(np.stack(answers), expected, atol=1e-5)
    for _ in range(4):  # whichever worker answers the scrape, it counts the requests of both
        assert _metrics(pool["url"])[OK] - before == len(images)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux")
def test_connections_opened_at_once_reach_every_worker(pool):
    port = int(pool["url"].rsplit(":", 1)[1])

    async def held_by_each_worker():
        opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(16)))
        try:
            deadline = time.monotonic() + 30
            while True:  # on one shared socket, the worker that woke first often accepted them all
                held = [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                            for c in worker.connections("tcp")) for worker in _workers(pool["pid"])]
                if sum(held) == 16 or time.monotonic() > deadline:
                    return held
                await asyncio.sleep(0.05)
        finally:
            for _, writer in opened:
                writer.close()

    held = asyncio.run(held_by_each_worker())
    assert sum(held) == 16 and min(held) >= 1, held


def test_grpc_is_served_by_the_workers(pool):
    client = grpcclient.InferenceServerClient(pool["grpc"])
    tensor = grpcclient.InferInput("image", [2, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 1, 28, 28), dtype=np.float32))
    assert client.infer("lenet", [tensor]).as_numpy("probabilities").shape == (2, 10)


def test_a_worker_that_dies_is_replaced_even_if_its_replacement_dies_starting(pool):
    first = _workers(pool["pid"])
    first[0].kill()
    deadline = time.monotonic() + 120
    while not (replacements := [w for w in _workers(pool["pid"]) if w.pid not in {p.pid for p in first}]):
        assert time.monotonic() < deadline, "no worker replaced the one that died"
        time.sleep(0.05)
    replacements[0].kill()  # while it loads the model: the server must go on, and try again
    gone = {p.pid for p in first[:1]} | {replacements[0].pid}
    while len(_workers(pool["pid"])) < 2 or gone & {w.pid for w in _workers(pool["pid"])}:
        assert time.monotonic() < deadline, "no worker replaced the one that died"
        time.sleep(0.2)
    for _ in range(10):
        with httpx.Client() as client:  # new connections reach the new worker too
            response = client.post(f"{pool['url']}/v2/models/lenet/infer", json=_body(np.zeros((1, 1, 28, 28))))
        assert response.status_code == 200


def test_an_export_that_cannot_be_served_is_one_line_not_one_per_worker(tmp_path):
    result = run_cli("serve", tmp_path / "missing", "--workers", "2", "--port", free_port())
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.faults
def test_workers_stop_when_the_parent_is_killed(quick_export):
    port = free_port()
    args = ["serve", str(quick_export), "--port", str(port), "--provider", "cpu", "--workers", "2"]
    with toolkit_server(args, ready_url=f"http://127.0.0.1:{port}/v2/health/ready",
                        ready_line="2 worker processes") as process:
        workers = _workers(process.pid)
        assert len(workers) == 2
        process.kill()  # SIGKILL: the parent cannot pass anything on
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, "workers outlived their parent"
    with socket.socket() as sock:  # and nothing holds the port
        sock.bind(("127.0.0.1", port))
