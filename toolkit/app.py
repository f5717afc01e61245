"""The Gradio sketchpad demo: draw a digit, see what the model sees and what it answers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from toolkit.classes import DIGITS
from toolkit.errors import ToolkitError
from toolkit.inference import Classification, classify
from toolkit.runtime import Predictor

log = logging.getLogger("toolkit.demo")
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"  # package data: in wheels too
CANVAS = (400, 400)
# MNIST strokes are about 1/8 of the digit's height; a digit drawn over most of a 400 px canvas
# is ~300 px tall, so a ~28 px brush gives MNIST-like strokes after the 20 px rescale.
BRUSH_SIZE = 28
MAX_UPLOAD = "5mb"
# Gradio's sketchpad opens with no tool selected; a demo should let people draw at once.
SELECT_BRUSH_JS = """() => { setTimeout(() => {
  document.querySelector('#sketchpad button[aria-label="Brush"]')?.click(); }, 300); }"""
CONCURRENCY = 4

Outputs = tuple[dict[str, float] | None, np.ndarray | None, str]


def model_card(predictor: Predictor) -> str:
    card = predictor.describe()
    accuracy = f"{card['test_accuracy']:.2%}" if isinstance(card["test_accuracy"], float) else "unknown"
    return (
        f"**model** `{card['arch']}` trained on `{card['dataset']}` · **test accuracy** {accuracy} · "
        f"**parity** {card['parity'] or 'not verified'} · **provider** onnxruntime-{card['provider']}"
    )


def what_to_draw(predictor: Predictor) -> str:
    """'a digit' for digit models, else the classes the model knows."""
    if tuple(predictor.class_names) == DIGITS:
        return "a digit"
    return "one of: " + ", ".join(predictor.class_names)


def framing_note(predictor: Predictor) -> str:
    framing, dataset = predictor.framing, predictor.metadata.get("dataset", "the training set")
    centre = "by its centre of mass" if framing.centre == "mass" else "by its bounding box"
    strokes = f" Strokes thinner than {framing.stroke:g} px are thickened to that." if framing.stroke else ""
    return (f"The drawing is cropped, scaled to {framing.box} px and centred {centre} in 28x28, "
            f"as the images of `{dataset}` were, before the model sees it.{strokes}")


def _render(result: Classification) -> Outputs:
    if result.label is None:
        return None, None, f"nothing to classify ({result.milliseconds:.1f} ms)"
    confidences = {item["label"]: item["probability"] for item in result.top_k}
    # Shown 6x, pixel for pixel, so people can see exactly what the model saw.
    seen = np.kron(result.digit * 255, np.ones((6, 6))).astype(np.uint8)
    return confidences, seen, f"**{result.label}** ({result.probability:.1%}) in {result.milliseconds:.1f} ms"


def make_handler(predictor: Predictor) -> Any:
    """The one function behind the sketchpad, the upload tab and the API."""

    def predict(image: Any) -> Outputs:
        if image is None:
            return None, None, "nothing to classify"
        try:
            result = classify(predictor, image, top_k=3)
        except ToolkitError as exc:
            log.info("rejected input: %s", exc)
            raise gr.Error(str(exc), print_exception=False) from None
        log.info("predicted %s in %.2f ms on %s", result.label, result.milliseconds, predictor.provider)
        return _render(result)

    return predict


def build_demo(predictor: Predictor) -> gr.Blocks:
    """The demo UI around a Predictor; `predict` is also a named API endpoint."""
    predict = make_handler(predictor)
    subject = what_to_draw(predictor)
    with gr.Blocks(title=f"toolkit · draw {subject}") as demo:
        gr.Markdown(f"# Draw {subject}\n{framing_note(predictor)}")
        gr.Markdown(model_card(predictor), elem_id="model-card")
        with gr.Row():
            with gr.Column():
                with gr.Tab("Draw"):
                    sketchpad = gr.Sketchpad(
                        canvas_size=CANVAS, type="numpy", image_mode="RGBA", label="sketchpad",
                        brush=gr.Brush(default_size=BRUSH_SIZE, colors=["#000000"], color_mode="fixed"),
                        layers=False, elem_id="sketchpad",
                    )
                    with gr.Row():
                        predict_button = gr.Button("Predict", variant="primary", elem_id="predict-button")
                        clear_button = gr.ClearButton(value="Clear", elem_id="clear-button")
                with gr.Tab("Upload"):
                    upload = gr.Image(type="filepath", image_mode=None, label="image file",
                                      sources=["upload", "clipboard"], elem_id="upload")
                    upload_button = gr.Button("Predict upload", elem_id="upload-button")
                    examples = sorted(EXAMPLES_DIR.glob("*.png")) if subject == "a digit" else []
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=upload, label="MNIST test digits")
            with gr.Column():
                label = gr.Label(num_top_classes=3, label="prediction", elem_id="prediction")
                seen = gr.Image(label="what the model saw (28x28)", height=168, interactive=False,
                                image_mode="L", format="png", elem_id="seen")
                status = gr.Markdown(elem_id="status", label="status")
        outputs = [label, seen, status]
        sketchpad.change(predict, sketchpad, outputs, show_progress="hidden", trigger_mode="always_last",
                         api_name="live_sketch", api_visibility="private")
        predict_button.click(predict, sketchpad, outputs, api_name="predict_sketch")
        upload_button.click(predict, upload, outputs, api_name="predict")
        upload.upload(predict, upload, outputs, api_name="live_upload", api_visibility="private")
        clear_button.add([sketchpad, upload, *outputs])
        demo.load(None, None, None, js=SELECT_BRUSH_JS)
    return demo


def launch(
    export_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    provider: str = "auto",
    threads: int | None = None,
    block: bool = True,
    check_integrity: bool = True,
) -> gr.Blocks:
    """Load the model and serve the demo (localhost only and no share link unless asked)."""
    predictor = Predictor(export_dir, provider=provider, threads=threads, check_integrity=check_integrity)
    log.info("serving %s on onnxruntime-%s", predictor.path, predictor.provider)
    demo = build_demo(predictor)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=256)
    try:
        demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
                    prevent_thread_lock=not block, show_error=True, quiet=not block,
                    allowed_paths=[str(EXAMPLES_DIR)])  # the example digits, wherever the demo runs from
    except OSError as exc:
        raise ToolkitError(f"cannot serve on {host}:{port}: {exc}") from exc
    return demo
