"""The demo as people and programs use it: a real Gradio server, gradio_client, headless Chromium."""

import base64
import contextlib
import io
import itertools
import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.conftest import REPO
from toolkit.core.fileio import sha256_file
from toolkit.core.locate import EXAMPLES_DIR, example_label
from toolkit.demo.app import MAX_BODY, launch
from toolkit.serving.launch import free_port

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")



@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback") / "corrections"


@pytest.fixture(scope="module")
def server(export_dir, feedback_dir):
    port = free_port()
    demo = launch(export_dir, port=port, provider="cpu", block=False, feedback_dir=feedback_dir)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def _label(result):
    return result[0]["label"]


def test_api_labels_mnist_test_digits(client):
    assert len(EXAMPLES) == 10
    for path in EXAMPLES:
        expected = example_label(path)
        result = client.predict(handle_file(str(path)), api_name="/predict")
        assert _label(result) == expected, path.name
        assert len(result[0]["confidences"]) == 3
        assert "ms" in result[2]


def test_api_says_when_there_is_nothing_to_classify(client, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), "white").save(blank)
    label, _seen, status = client.predict(handle_file(str(blank)), api_name="/predict")
    assert label is None or label.get("label") is None
    assert "nothing to classify" in status


def test_bad_uploads_get_readable_errors_and_the_server_keeps_serving(client, tmp_path):
    bad_files = {
        "notes.png": b"not an image at all",
        "cut.png": EXAMPLES[0].read_bytes()[:120],
    }
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000), 1).save(huge)
    paths = [huge]
    for name, data in bad_files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    for path in paths:
        with pytest.raises(Exception) as caught:
            client.predict(handle_file(str(path)), api_name="/predict")
        assert "image" in str(caught.value).lower()
    assert _label(client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")) == "7"


def test_sketch_endpoint_accepts_an_editor_value(client, tmp_path):
    canvas = Image.new("RGBA", (400, 400), (255, 255, 255, 255))
    digit = Image.open(EXAMPLES[4]).convert("L").resize((280, 280))  # a 4, dark on light
    canvas.paste(digit, (60, 60))
    path = tmp_path / "canvas.png"
    canvas.save(path)
    value = {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path)), "id": None}
    assert _label(client.predict(value, api_name="/predict_sketch")) == "4"


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """13000x13000 (169 Mpx: over the 40 Mpx cap, under PIL's own bomb limit of 179 Mpx) in a
    46 KB PNG; decoded as the sketchpad's RGBA it takes 676 MB."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (13_000, 13_000), 1).save(path)
    return path


def _kb(field):
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))


@contextlib.contextmanager
def peak_rss_growth():
    """The growth of this process's peak RSS (the test server runs in it) over the block, in MB."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before, growth = _kb("VmRSS"), {}
    yield growth
    growth["mb"] = (_kb("VmHWM") - before) / 1024


def _still_serves(client):
    assert _label(client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")) == "7"


@pytest.mark.parametrize("part", ["composite", "layers"])
def test_a_sketch_over_the_pixel_cap_is_refused_before_it_is_decoded(client, huge_png, part):
    value = {"background": None, "layers": [], "composite": None, "id": None}
    value[part] = [handle_file(str(huge_png))] if part == "layers" else handle_file(str(huge_png))
    with peak_rss_growth() as growth, pytest.raises(AppError, match="13000x13000 is too large"):
        client.predict(value, api_name="/predict_sketch")
    assert growth["mb"] < 200, growth  # only its header was read
    _still_serves(client)


def _call(http, api_name, data):
    """A Gradio REST call: the event's result stream."""
    event = http.post(f"call/{api_name}", json={"data": data})
    event.raise_for_status()
    return http.get(f"call/{api_name}/{event.json()['event_id']}").text


def test_sketch_images_the_browser_posts_ahead_are_checked_too(server, client, huge_png):
    with httpx.Client(base_url=f"{server}gradio_api/", timeout=120) as http:
        components = http.get(f"{server}config").json()["components"]
        form = {"id": "sketch-1", "type": "composite", "index": "null", "fn_name": "accept_blobs",
                "session_hash": "test", "component_id": str(next(c["id"] for c in components
                                                                 if c["type"] == "imageeditor"))}
        posted = http.post("component_server/", data=form, files={"file": ("c.png", huge_png.read_bytes())})
        assert posted.status_code == 200, posted.text
        with peak_rss_growth() as growth:
            stream = _call(http, "predict_sketch", [{"id": "sketch-1", "background": None, "layers": [],
                                                     "composite": None}])
        assert "event: error" in stream and "13000x13000 is too large" in stream, stream
        assert growth["mb"] < 200, growth
        bad_layer = http.post("component_server/", data={**form, "type": "layer", "index": "x"},
                              files={"file": ("c.png", EXAMPLES[0].read_bytes())})
        assert bad_layer.status_code == 400 and "layer" in bad_layer.json()["detail"]
    _still_serves(client)


def test_only_uploaded_files_are_read(server, client):
    # Gradio's image component opens any path on the server when `meta` is left out, and its
    # refusal of a path outside its upload folder prints the path (a payload's size) into the log.
    long_path = {"path": "/tmp/gradio/" + "x" * 1_000_000, "meta": {"_type": "gradio.FileData"}}
    requests = [("predict", [{"path": str(EXAMPLES[0])}]),
                ("predict_sketch", [{"composite": long_path, "layers": []}])]
    with httpx.Client(base_url=f"{server}gradio_api/", timeout=120) as http:
        for api_name, data in requests:
            refused = http.post(f"call/{api_name}", json={"data": data})
            assert refused.status_code == 400 and "not uploaded to this server" in refused.text, refused.text[:300]
            assert len(refused.text) < 200
    _still_serves(client)


def _post_head(sock, server, route, length_header):
    host = urlsplit(server).hostname
    sock.sendall(f"POST /gradio_api/{route} HTTP/1.1\r\nHost: {host}\r\n"
                 f"Content-Type: application/json\r\n{length_header}\r\n\r\n".encode())


def _reply(sock):
    """The server's answer, read until its body has come or the connection closes."""
    reply = b""
    while b"too large" not in reply and (chunk := sock.recv(65536)):
        reply += chunk
    return reply


@pytest.mark.parametrize("route", ["call/predict_sketch", "queue/join", "run/predict", "upload", "component_server"])
def test_a_body_over_the_cap_is_refused_before_it_is_sent(server, client, route):
    address = urlsplit(server)
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        _post_head(sock, server, route, "Content-Length: 40000000")
        sock.sendall(b'{"data": ["' + b"A" * 65536)  # and not the other 40 MB: the answer comes first
        reply = _reply(sock)
    assert reply.startswith(b"HTTP/1.1 413") and b"request body too large" in reply, reply[:300]
    _still_serves(client)


def test_a_streamed_body_is_cut_off_at_the_cap(server, client):
    address = urlsplit(server)
    chunk = b"A" * 65536
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        _post_head(sock, server, "call/predict", "Transfer-Encoding: chunked")
        for _ in range(MAX_BODY // len(chunk) + 2):  # past the cap, but never the final chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = _reply(sock)
    assert reply.startswith(b"HTTP/1.1 413") and b"request body too large" in reply, reply[:300]
    _still_serves(client)


def test_a_data_url_is_read_without_a_traceback(server, client, capfd):
    marker = base64.b64encode(b"not an image " * 1000).decode()
    with httpx.Client(base_url=f"{server}gradio_api/", timeout=120) as http:
        stream = _call(http, "predict", [{"url": f"data:image/png;base64,{marker}"}])
    assert "event: error" in stream and "not a supported image file" in stream, stream
    logged = capfd.readouterr()
    assert "Traceback" not in logged.err and marker[:40] not in logged.err + logged.out
    _still_serves(client)


def _stroke(page, points):
    page.mouse.move(*points[0])
    page.mouse.down()
    for start, end in itertools.pairwise(points):
        for t in np.linspace(0, 1, 12)[1:]:
            page.mouse.move(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
    page.mouse.up()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (installed by .ci/run)")
@pytest.mark.parametrize(
    ("digit", "strokes"),
    [
        # In units of the canvas height, centred: a "7" (bar, then diagonal) and a "1".
        ("7", [[(-0.25, -0.3), (0.25, -0.3), (-0.05, 0.35)]]),
        ("1", [[(0.02, -0.35), (0.0, 0.35)]]),
    ],
)
def test_drawing_in_the_browser_shows_the_label(server, digit, strokes):
    with _browser_page(server, f"browser-draw-{digit}.png") as page:
        # The page says what to draw and how the drawing is framed for this MNIST model.
        assert page.get_by_role("heading", name="Draw a digit").is_visible()
        assert page.get_by_text("scaled to 20 px and centred by its centre of mass").is_visible()
        _draw_and_predict(page, strokes)
        status = page.locator("#status").inner_text()
        assert status.startswith(digit), status
        assert page.locator("#prediction").inner_text().strip().splitlines()[1] == digit


@contextlib.contextmanager
def _browser_page(server, screenshot):
    """A page of the demo in headless Chromium; a screenshot in test-artifacts/ if the block fails."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.goto(server)
            page.locator("#sketchpad canvas").first.wait_for(timeout=60_000)
            page.locator("body[data-brush-ready]").wait_for(state="attached")  # the demo has chosen the brush
            yield page
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / screenshot))
            raise
        finally:
            browser.close()


def _draw_and_predict(page, strokes):
    box = page.locator("#sketchpad canvas").first.bounding_box()
    cx, cy, h = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["height"]
    for stroke in strokes:
        _stroke(page, [(cx + dx * h, cy + dy * h) for dx, dy in stroke])
    page.click("#predict-button")
    page.wait_for_function(
        "() => /\\(\\d+\\.\\d%\\) in/.test(document.querySelector('#status')?.innerText ?? '')",
        timeout=30_000,
    )


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (installed by .ci/run)")
def test_a_correction_made_in_the_browser_is_saved_with_all_its_fields(server, feedback_dir, export_dir):
    with _browser_page(server, "browser-feedback.png") as page:
        assert feedback_dir.name in page.locator("#feedback-note").inner_text()
        _draw_and_predict(page, [[(-0.25, -0.3), (0.25, -0.3), (-0.05, 0.35)]])  # a "7"
        predicted = page.locator("#status").inner_text().split()[0]
        given = "1" if predicted != "1" else "2"  # "wrong, it is ..."
        page.click("#feedback-label input")
        page.get_by_role("option", name=given, exact=True).click()
        page.click("#feedback-save")
        page.wait_for_function(
            "() => /saved as/.test(document.querySelector('#feedback-status')?.innerText ?? '')", timeout=30_000)
    saved = [json.loads(path.read_text()) for path in feedback_dir.glob("*.json")]
    example = next(e for e in saved if e["label"] == given and e["predicted"] == predicted)
    assert set(example) == {"format", "version", "id", "label", "predicted", "probabilities", "model_sha256",
                            "time", "drawing_png", "seen_png"}  # and nothing about the person
    assert example["model_sha256"] == sha256_file(export_dir / "model.onnx")
    assert set(example["probabilities"]) == {str(d) for d in range(10)}
    assert max(example["probabilities"], key=example["probabilities"].get) == predicted
    drawing = Image.open(io.BytesIO(base64.b64decode(example["drawing_png"])))
    seen = Image.open(io.BytesIO(base64.b64decode(example["seen_png"])))
    assert drawing.size == (400, 400) and seen.size == (28, 28)
    index = [json.loads(line) for line in (feedback_dir / "index.jsonl").read_text().splitlines()]
    assert example["id"] in {line["id"] for line in index}


def test_feedback_on_an_upload_can_be_saved_through_the_api(client, feedback_dir):
    message = client.predict(None, handle_file(str(EXAMPLES[3])), "5", api_name="/save_correction")
    assert "saved as 5" in message
    saved = [json.loads(p.read_text()) for p in feedback_dir.glob("*.json")]
    assert any(e["label"] == "5" and e["predicted"] == example_label(EXAMPLES[3]) for e in saved)
