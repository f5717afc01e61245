"""The Gradio sketchpad demo: draw a digit, see what the model sees and what it answers."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from fastapi import HTTPException
from gradio.components.base import server
from gradio.components.image_editor import AcceptBlobs, EditorData, EditorDataBlobs
from gradio.data_classes import FileData, ImageData
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from toolkit.core.bodycap import BodyTooLarge, declared_too_large, read_capped, replaying, send_json
from toolkit.core.classes import DIGITS
from toolkit.core.errors import ToolkitError
from toolkit.core.locate import EXAMPLES_DIR
from toolkit.feedback.store import FeedbackStore, new_example
from toolkit.imaging.decode import MAX_DECODE_PIXELS, ImageReadError, open_image, working_picture
from toolkit.runtime.inference import Classification, classify
from toolkit.runtime.predictor import Predictor, ReloadingPredictor

log = logging.getLogger("toolkit.demo")
CANVAS = (400, 400)
# MNIST strokes are about 1/8 of the digit's height; a digit drawn over most of a 400 px canvas
# is ~300 px tall, so a ~28 px brush gives MNIST-like strokes after the 20 px rescale.
BRUSH_SIZE = 28
MAX_UPLOAD = 5 * 1024 * 1024  # bytes in one uploaded file
# Every request body: one upload-sized image, base64-encoded in JSON (4/3), and its envelope.
MAX_BODY = MAX_UPLOAD * 4 // 3 + 64 * 1024
MAX_LAYERS = 4  # the demo's sketchpad sends one layer; API callers get a few
# The browser posts a sketch's images before the call that uses them; posted but never used,
# they would pile up, so at most this many bytes of them are kept (oldest dropped first).
PENDING_SKETCH_BYTES = 4 * MAX_BODY
# Gradio keeps a copy of every component's config (~40 KB) per session, and every API call
# is a session of its own; the demo keeps no per-session state, so few sessions are kept.
SESSIONS = 64
CACHE_SECONDS = 3600  # uploads and the images shown are deleted from Gradio's cache this old
# Gradio's sketchpad opens with no tool selected; a demo should let people draw at once. The
# page is marked once the brush is chosen, so a browser test can wait for it.
SELECT_BRUSH_JS = """() => { setTimeout(() => {
  document.querySelector('#sketchpad button[aria-label="Brush"]')?.click();
  document.body.dataset.brushReady = "1"; }, 300); }"""
CONCURRENCY = 4
CARD_REFRESH_S = 5.0

Outputs = tuple[dict[str, float] | None, np.ndarray | None, str]


def model_card(predictor: Predictor) -> str:
    card = predictor.describe()
    accuracy = f"{card['test_accuracy']:.2%}" if isinstance(card["test_accuracy"], float) else "unknown"
    return (
        f"**model** `{card['arch']}` trained on `{card['dataset']}` · **test accuracy** {accuracy} · "
        f"**parity** {card['parity'] or 'not verified'} · **integrity** {card['integrity']} · "
        f"**provider** onnxruntime-{card['provider']}"
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


def _refused(message: str) -> gr.Error:
    """A readable error for the caller; the log gets the reason, never the payload."""
    log.info("rejected input: %s", message)
    return gr.Error(message, print_exception=False)


def _source(file: FileData | ImageData | None, cache: str) -> str | bytes | None:
    """The undecoded image a request names: a data URL's bytes, or a file in Gradio's cache
    (where uploads land; a path anywhere else on the server is refused)."""
    if file is None:
        return None
    if file.url and file.url.startswith("data:"):
        try:
            return base64.b64decode(file.url.partition(",")[2], validate=True)
        except (binascii.Error, ValueError):
            raise _refused("cannot read this image: its data URL is not valid base64") from None
    if not file.path or not Path(file.path).resolve().is_relative_to(Path(cache).resolve()):
        raise _refused("cannot read this image: it was not uploaded to this server")
    return file.path


def _check_pixels(sources: list[str | bytes]) -> None:
    """Refuse images over MAX_DECODE_PIXELS, alone or together, from their headers alone."""
    total = 0
    for source in sources:
        try:
            with open_image(source) as image:
                total += image.width * image.height
        except ImageReadError as exc:
            raise _refused(str(exc)) from None
        if total > MAX_DECODE_PIXELS:
            raise _refused(
                f"cannot read this sketch: its images add up to {total:,} pixels (limit {MAX_DECODE_PIXELS:,})")


def guard_sketchpad(sketchpad: gr.Sketchpad) -> gr.Sketchpad:
    """`sketchpad` handing the handler its images undecoded (file paths or bytes), after their
    headers are read: Gradio's own preprocessing decodes every layer to a full-size array
    first, whatever its size. The images the browser posts ahead of a call (accept_blobs) are
    kept within PENDING_SKETCH_BYTES. Set on the instance: a subclass of a Gradio component
    makes Gradio write a .pyi file beside this module."""
    lock, cache = threading.Lock(), sketchpad.GRADIO_CACHE

    def preprocess(payload: EditorData | None) -> dict[str, Any] | None:
        if payload is None:
            return None
        if payload.id is not None:  # the browser's way: the images were posted to accept_blobs
            with lock:
                blobs = sketchpad.blob_storage.pop(payload.id, None)
            blobs = blobs or EditorDataBlobs(background=None, layers=[], composite=None)
            background, layers, composite = blobs.background, blobs.layers, blobs.composite
        else:
            background, composite = _source(payload.background, cache), _source(payload.composite, cache)
            layers = [_source(layer, cache) for layer in payload.layers]
        layers = [layer for layer in layers if layer is not None]
        if len(layers) > MAX_LAYERS:
            raise _refused(f"cannot read this sketch: {len(layers)} layers (limit {MAX_LAYERS})")
        _check_pixels([part for part in (background, composite, *layers) if part is not None])
        return {"background": background, "layers": layers, "composite": composite}

    @server
    def accept_blobs(data: AcceptBlobs) -> None:
        """Gradio's, its input checked first (it answers a bad layer index with a 500)."""
        kind, index = data.data.get("type"), data.data.get("index")
        layer = kind == "layer" and index not in (None, "null")
        if kind not in ("background", "composite", "layer") or not data.files or (
                layer and not (str(index).isdigit() and int(index) < MAX_LAYERS)):
            raise HTTPException(400, f"expected one image: background, composite or layer 0..{MAX_LAYERS - 1}")
        with lock:
            gr.Sketchpad.accept_blobs(sketchpad, data)
            storage = sketchpad.blob_storage
            while len(storage) > 1 and sum(map(_blob_bytes, storage.values())) > PENDING_SKETCH_BYTES:
                storage.pop(next(iter(storage)))

    sketchpad.preprocess = preprocess
    sketchpad.accept_blobs = accept_blobs
    return sketchpad


def _blob_bytes(blobs: EditorDataBlobs) -> int:
    return sum(len(part) for part in (blobs.background, blobs.composite, *blobs.layers) if part)


def guard_upload(image: gr.Image) -> gr.Image:
    """`image` handing the handler the uploaded file (or a data URL's bytes) undecoded: Gradio's
    own preprocessing decodes data URLs whole and opens any path on the server."""
    image.preprocess = lambda payload: _source(payload, image.GRADIO_CACHE)
    return image


class RequestGuard:
    """ASGI middleware in front of Gradio. A body over `limit` bytes is answered 413 before it
    is read whole: at once when its Content-Length says so, else as soon as the bytes received
    pass it. A JSON body naming a file outside Gradio's upload folder is answered 400 before
    Gradio sees it: Gradio's own refusal prints the path, which may be megabytes, into the log."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body too large (limit {self.limit:,} bytes)"
        if declared_too_large(scope, self.limit):
            await self._refuse(scope, send, 413, too_large)
            return
        if not dict(scope["headers"]).get(b"content-type", b"").startswith(b"application/json"):
            await self._stream_capped(scope, receive, send)
            return
        try:
            body = await read_capped(scope, receive, self.limit)
        except BodyTooLarge:
            await self._refuse(scope, send, 413, too_large)
            return
        if body is None:  # the client left
            return
        if _names_foreign_file(body):
            await self._refuse(scope, send, 400, "a file named in the request was not uploaded to this server")
            return
        await self.app(scope, replaying(body, receive), send)

    async def _stream_capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a (multipart) body through as it arrives, cut off where it passes the limit."""
        received, refused, started = 0, False, False

        async def capped_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not refused:
                refused = True
                if not started:
                    await self._refuse(scope, send, 413, f"request body too large (limit {self.limit:,} bytes)")
                return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if not refused:
                started = True
                await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            if not refused:  # else the request is answered and the app only failed to read on
                raise

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, detail: str) -> None:
        log.info("refused a request to %s: %s", scope.get("path", "?"), detail)
        await send_json(send, status, {"detail": detail})


def _names_foreign_file(body: bytes) -> bool:
    """Whether a JSON body holds a file (an object with a `path`) outside Gradio's upload folder."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return False  # not JSON: Gradio refuses it without printing it
    uploads, pending = Path(get_upload_folder()).resolve(), [value]
    while pending:  # a loop, not recursion: the nesting is the client's to choose
        item = pending.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if path is not None and not _inside(path, uploads):
                return True
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _inside(path: Any, folder: Path) -> bool:
    try:
        return isinstance(path, str) and len(path) < 4096 and Path(path).resolve().is_relative_to(folder)
    except (OSError, ValueError):  # a NUL byte, a loop of links
        return False


def make_handler(live: ReloadingPredictor) -> Any:
    """The one function behind the sketchpad, the upload tab and the API."""

    def predict(image: Any) -> Outputs:
        if image is None:
            return None, None, "nothing to classify"
        predictor = live.current
        try:
            result = classify(predictor, image, top_k=3)
        except ToolkitError as exc:
            raise _refused(str(exc)) from None
        log.info("predicted %s in %.2f ms on %s", result.label, result.milliseconds, predictor.provider)
        return _render(result)

    return predict


def make_feedback_handler(live: ReloadingPredictor, store: FeedbackStore) -> Any:
    """Saves what the person says the drawing (or upload) they last classified is."""

    def save(source: str, sketch: Any, upload: Any, given: str | None, confirm: bool = False) -> str:
        image = upload if source == "upload" or sketch is None else sketch  # API callers send one of them
        if image is None:
            return "nothing to save: draw or upload first"
        predictor = live.current
        try:
            result = classify(predictor, image, top_k=len(predictor.class_names))
            if result.label is None:
                return "nothing to save: the model saw nothing to classify"
            label = result.label if confirm else given
            if label not in predictor.class_names:
                return "pick what it is, then save"
            example = new_example(working_picture(image), result.digit, label, result.label,
                                  {r["label"]: r["probability"] for r in result.top_k}, predictor.model_sha256)
            store.save(example)
        except ToolkitError as exc:
            raise _refused(str(exc)) from None
        log.info("saved feedback %s", example.id)
        verdict = "confirmed" if confirm else f"saved as {label} (the model said {result.label})"
        return f"{verdict}; thank you ({example.id[:8]})"

    return save


def build_demo(live: ReloadingPredictor, feedback: FeedbackStore | None = None) -> gr.Blocks:
    """The demo UI around the export's Predictor (switching when the export is replaced);
    `predict` is also a named API endpoint. With `feedback`, people can say whether an answer
    was right and correct it; each goes to the store."""
    predict, predictor = make_handler(live), live.current
    subject = what_to_draw(predictor)
    with gr.Blocks(title=f"toolkit · draw {subject}", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        gr.Markdown(f"# Draw {subject}\n{framing_note(predictor)}")
        card = gr.Markdown(model_card(predictor), elem_id="model-card")
        # The card follows the export: a promoted model shows up without a restart.
        gr.Timer(CARD_REFRESH_S).tick(lambda: model_card(live.current), None, card, show_progress="hidden",
                                      api_visibility="private")
        source = gr.State("sketch")  # the tab whose image the feedback is about
        with gr.Row():
            with gr.Column():
                with gr.Tab("Draw") as draw_tab:
                    sketchpad = guard_sketchpad(gr.Sketchpad(
                        canvas_size=CANVAS, type="filepath", image_mode="RGBA", label="sketchpad",
                        brush=gr.Brush(default_size=BRUSH_SIZE, colors=["#000000"], color_mode="fixed"),
                        layers=False, elem_id="sketchpad",
                    ))
                    with gr.Row():
                        predict_button = gr.Button("Predict", variant="primary", elem_id="predict-button")
                        clear_button = gr.ClearButton(value="Clear", elem_id="clear-button")
                with gr.Tab("Upload") as upload_tab:
                    upload = guard_upload(gr.Image(type="filepath", image_mode=None, label="image file",
                                                   sources=["upload", "clipboard"], elem_id="upload"))
                    upload_button = gr.Button("Predict upload", elem_id="upload-button")
                    examples = sorted(EXAMPLES_DIR.glob("*.png")) if subject == "a digit" else []
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=upload, label="MNIST test digits")
            with gr.Column():
                label = gr.Label(num_top_classes=3, label="prediction", elem_id="prediction")
                seen = gr.Image(label="what the model saw (28x28)", height=168, interactive=False,
                                image_mode="L", format="png", elem_id="seen")
                status = gr.Markdown(elem_id="status", label="status")
                if feedback is not None:
                    gr.Markdown(f"Right or wrong? What you say is saved to `{feedback.folder}`: the drawing, what "
                                "the model saw, your label and its answer; nothing else.", elem_id="feedback-note")
                    with gr.Row():
                        right_button = gr.Button("Right", elem_id="feedback-right")
                        given = gr.Dropdown(list(predictor.class_names), value=None, label="wrong? it is",
                                            elem_id="feedback-label")
                        save_button = gr.Button("Save correction", elem_id="feedback-save")
                    feedback_status = gr.Markdown(elem_id="feedback-status")
        outputs = [label, seen, status]
        draw_tab.select(lambda: "sketch", None, source, api_visibility="private")
        upload_tab.select(lambda: "upload", None, source, api_visibility="private")
        if feedback is not None:
            save = make_feedback_handler(live, feedback)
            save_button.click(save, [source, sketchpad, upload, given], feedback_status, api_name="save_correction")
            right_button.click(lambda *args: save(*args, confirm=True), [source, sketchpad, upload, given],
                               feedback_status, api_name="confirm")
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
    feedback_dir: str | Path | None = None,
) -> gr.Blocks:
    """Load the model and serve the demo (localhost only and no share link unless asked); with
    `feedback_dir`, people's corrections are saved there."""
    live = ReloadingPredictor(export_dir, provider=provider, threads=threads, check_integrity=check_integrity)
    log.info("serving %s on onnxruntime-%s", live.current.path, live.current.provider)
    demo = build_demo(live, FeedbackStore(feedback_dir) if feedback_dir is not None else None)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=256)
    try:
        demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
                    prevent_thread_lock=not block, show_error=True, quiet=not block,
                    allowed_paths=[str(EXAMPLES_DIR)],  # the example digits, wherever the demo runs from
                    state_session_capacity=SESSIONS,
                    app_kwargs={"middleware": [Middleware(RequestGuard, limit=MAX_BODY)]})
    except OSError as exc:
        raise ToolkitError(f"cannot serve on {host}:{port}: {exc}") from exc
    return demo
