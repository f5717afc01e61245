"""The demo as people and programs use it: a real Gradio server, gradio_client, headless Chromium."""

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from tests.conftest import REPO
from toolkit.app import EXAMPLES_DIR, launch
from toolkit.bench import example_label, free_port

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")



@pytest.fixture(scope="module")
def server(export_dir):
    port = free_port()
    demo = launch(export_dir, port=port, provider="cpu", block=False)
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


def _stroke(page, points):
    page.mouse.move(*points[0])
    page.mouse.down()
    for start, end in itertools.pairwise(points):
        for t in np.linspace(0, 1, 12)[1:]:
            page.mouse.move(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
    page.mouse.up()


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
            canvas = page.locator("#sketchpad canvas").first
            canvas.wait_for(timeout=60_000)
            # The page says what to draw and how the drawing is framed for this MNIST model.
            assert page.get_by_role("heading", name="Draw a digit").is_visible()
            assert page.get_by_text("scaled to 20 px and centred by its centre of mass").is_visible()
            page.locator('#sketchpad button[aria-label="Brush"]').wait_for()
            time.sleep(1.0)  # the demo selects the brush shortly after load
            box = canvas.bounding_box()
            cx, cy, h = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["height"]
            for stroke in strokes:
                _stroke(page, [(cx + dx * h, cy + dy * h) for dx, dy in stroke])
            page.click("#predict-button")
            page.wait_for_function(
                "() => /\\(\\d+\\.\\d%\\) in/.test(document.querySelector('#status')?.innerText ?? '')",
                timeout=30_000,
            )
            status = page.locator("#status").inner_text()
            assert status.startswith(digit), status
            assert page.locator("#prediction").inner_text().strip().splitlines()[1] == digit
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"browser-draw-{digit}.png"))
            raise
        finally:
            browser.close()
