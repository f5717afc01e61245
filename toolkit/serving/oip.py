"""An export as Open Inference Protocol (v2) models on KServe's model server.

Two models share one Predictor and one DynamicBatcher:
- `NAME` keeps the exported ONNX contract: `image` FP32 [-1, 1, 28, 28] in, `logits` and
  `probabilities` FP32 [-1, classes] out, as the Triton repository serves it;
- `NAME-image` takes encoded images (BYTES, each element base64 text, as KServe's image
  examples send them), frames them as the demo does, and answers `label` (BYTES; empty where
  there was nothing to classify) and `probabilities`.

Every malformed request is an `InvalidInput` (400) naming what is wrong; only a broken model is
an `InferenceError` (500).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import reprlib
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from toolkit.core.contract import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAMES
from toolkit.core.errors import ToolkitError
from toolkit.imaging.decode import open_image
from toolkit.imaging.framing import Framing
from toolkit.imaging.preprocess import preprocess
from toolkit.runtime.predictor import Predictor, ReloadingPredictor, usable_cores
from toolkit.serving.batching import DynamicBatcher
from toolkit.serving.kserve_adapter import import_kserve
from toolkit.serving.options import QUOTED_CHARS

kserve = import_kserve()
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402  (after the argv guard)
from kserve.errors import InferenceError, InvalidInput  # noqa: E402
from kserve.protocol.model_repository_extension import ModelRepositoryExtension  # noqa: E402

MAX_IMAGES_PER_REQUEST = 4096  # tensors: 12.8 MB of pixels; the body cap bounds it too
MAX_FILES_PER_REQUEST = 64  # encoded images, each decoded and framed on the server
MAX_PIXELS_PER_REQUEST = 50_000_000  # all of a request's images together: seconds of work, not minutes
INLINE_VALUES = 64 * 784  # tensors with more values are converted and checked off the event loop


_QUOTE = reprlib.Repr()
_QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlist, _QUOTE.maxlevel = QUOTED_CHARS, QUOTED_CHARS, 8, 2


def quoted(value: Any) -> str:
    """`value` (a name, shape or list of the client's: any size) as an error message quotes it:
    its repr, cut short (a 5 MB name came back as a 5 MB error)."""
    return _QUOTE.repr(value)


def declared_problem(inputs: Sequence[tuple[Any, Any, Any]], datatype: str) -> str | None:
    """What is wrong with a request's inputs as declared (name, datatype, shape; no data), or
    None: the cheapest facts, checked before any element is read."""
    names = [name for name, _, _ in inputs]
    if names != [INPUT_NAME]:
        return f"expected one input {INPUT_NAME!r}, got {quoted(names) if names else 'none'}"
    _, declared, shape = inputs[0]
    if declared != datatype:
        return f"input {INPUT_NAME!r} must be {datatype}, got {str(declared)[:40]}"
    shape = list(shape) if isinstance(shape, list | tuple) else shape
    if datatype == "FP32" and not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == list(IMAGE_SHAPE)
                                   and type(shape[0]) is int and 1 <= shape[0] <= MAX_IMAGES_PER_REQUEST):
        return (f"input {INPUT_NAME!r} must have shape [N, 1, 28, 28] with N from 1 to {MAX_IMAGES_PER_REQUEST} "
                f"(at most {MAX_IMAGES_PER_REQUEST} images a request: send more in several), got {quoted(shape)}")
    if datatype == "BYTES" and not (isinstance(shape, list) and 1 <= len(shape) <= 2 and shape[1:] in ([], [1])
                                    and type(shape[0]) is int and 1 <= shape[0] <= MAX_FILES_PER_REQUEST):
        return (f"input {INPUT_NAME!r} must have shape [N] (or [N, 1]) with N from 1 to {MAX_FILES_PER_REQUEST} "
                f"(at most {MAX_FILES_PER_REQUEST} image files a request), got {quoted(shape)}")
    return None


def _single_input(request: InferRequest, datatype: str) -> Any:
    problem = declared_problem([(i.name, i.datatype, i.shape) for i in request.inputs], datatype)
    if problem:
        raise InvalidInput(problem)
    return request.inputs[0]


def _as_numpy(tensor: Any) -> np.ndarray:
    try:
        return tensor.as_numpy()
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"input {quoted(tensor.name)}: its data does not fit {tensor.datatype} shape "
                           f"{tensor.shape} ({str(exc).splitlines()[0][:120]})") from None


def _json_numbers(tensor: Any) -> np.ndarray:
    """A JSON tensor's data, which must be numbers: KServe's own conversion would read strings
    ("0.5") and booleans as numbers, and answer as if they were pixels."""
    flat = not isinstance(tensor.data[0], list)
    if flat and len(tensor.data) != math.prod(tensor.shape):  # before converting a single element
        raise InvalidInput(f"input {quoted(tensor.name)}: {len(tensor.data)} values do not fill shape {tensor.shape}")
    try:
        values = np.array(tensor.data)
    except ValueError:  # nested lists of different lengths
        values = np.array([], dtype=object)
    if values.dtype.kind not in "iuf":
        raise InvalidInput(f"input {quoted(tensor.name)}: its data must be numbers (no strings, booleans or nulls) "
                           f"that fill shape {tensor.shape}")
    try:
        return values.reshape(tensor.shape)
    except ValueError:
        raise InvalidInput(f"input {quoted(tensor.name)}: {values.size} values do not fill shape "
                           f"{tensor.shape}") from None


def images_from(request: InferRequest) -> np.ndarray:
    """The float32 [N, 1, 28, 28] batch an infer request to the tensor model carries."""
    tensor = _single_input(request, "FP32")
    # JSON data or gRPC contents (a list), else raw bytes (the binary extension, gRPC's raw contents)
    images = _json_numbers(tensor) if isinstance(tensor.data, list) and tensor.data else _as_numpy(tensor)
    if not np.isfinite(images).all():
        raise InvalidInput(f"input {INPUT_NAME!r} holds NaN or infinite values")
    if images.size and not (images.min() >= 0 and images.max() <= 1):
        # The contract: pixels in [0, 1]. Far outside it the model's output overflows, and 0..255
        # pixels would be answered, wrongly, without a word.
        raise InvalidInput(f"input {INPUT_NAME!r} holds pixels from {images.min():g} to {images.max():g}; they must "
                           "be in [0, 1] (white digit on black; divide 0..255 pixels by 255)")
    return np.ascontiguousarray(images, dtype=np.float32)


def encoded_images_from(request: InferRequest) -> list[bytes]:
    """The encoded image files an infer request to the image model carries."""
    tensor = _single_input(request, "BYTES")
    files = []
    for index, element in enumerate(_as_numpy(tensor).reshape(-1)):
        text = element.decode("ascii", "replace") if isinstance(element, bytes) else str(element)
        try:
            files.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"input {INPUT_NAME!r}[{index}] is not base64 text of an image file") from None
    return files


def _output(name: str, values: np.ndarray, datatype: str) -> InferOutput:
    # Held as raw bytes, which the response turns into what each protocol and request asks for
    # (a list, once, for JSON); held as a list it would be converted back and forth.
    output = InferOutput(name, list(values.shape), datatype)
    output.set_data_from_numpy(values, binary_data=True)
    return output


def _response(model: kserve.Model, request: InferRequest, outputs: list[InferOutput]) -> InferResponse:
    """The answer: the outputs the request names, in its order (all of them if it names none)."""
    by_name = {output.name: output for output in outputs}
    requested = [wanted.name for wanted in request.request_outputs or ()]
    for name in requested:  # KServe's gRPC side would leave them out unsaid
        if name not in by_name:
            raise InvalidInput(f"{model.name} has no output {quoted(name)}; it answers {', '.join(by_name)}")
    if len(set(requested)) < len(requested):
        raise InvalidInput(f"outputs {quoted(requested)} name an output more than once")
    if requested:  # KServe's REST side picks them out itself, its gRPC side sends every output
        outputs = [by_name[name] for name in requested]
    # The protocol makes the request id optional, kserve's response model requires one.
    return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=model.name,
                         infer_outputs=outputs, use_binary_outputs=request.use_binary_outputs,
                         requested_outputs=request.request_outputs)


async def _run(batcher: DynamicBatcher, images: np.ndarray) -> list[np.ndarray]:
    try:
        return await batcher.submit(images)
    except ToolkitError as exc:  # the model answered outside its contract (NaN, wrong shape)
        raise InferenceError(str(exc)) from None


class ExportModel(kserve.Model):
    """A model of the export at a path (switching when it is replaced, e.g. promoted) and the
    batcher it shares. Ready once built (the Predictor has loaded and checked the export)."""

    datatype: str  # of its one input
    max_values: int  # the most elements a request's input may hold

    def declared_problem(self, inputs: Sequence[tuple[Any, Any, Any]]) -> str | None:
        """What is wrong with a request's (name, datatype, shape) inputs for this model, or None."""
        return declared_problem(inputs, self.datatype)

    def __init__(self, name: str, live: ReloadingPredictor, batcher: DynamicBatcher) -> None:
        super().__init__(name)
        self.live, self.batcher = live, batcher
        self.ready = True

    @property
    def predictor(self) -> Predictor:
        return self.live.current

    @property
    def parameters(self) -> dict[str, Any]:
        """What the metadata endpoint tells about the served export beyond its tensors."""
        predictor = self.predictor
        return {
            "class_names": predictor.class_names,
            "dataset": predictor.metadata.get("dataset"),
            "arch": predictor.metadata.get("arch"),
            "normalization_in_graph": predictor.metadata.get("normalization_baked_in"),
            "checkpoint_sha256": predictor.metadata.get("source_checkpoint_sha256"),
            "parity": predictor.parity,
            "integrity": predictor.integrity,
            "provider": predictor.provider,
        }


class TensorModel(ExportModel):
    """The exported ONNX model under its own contract: pixels in, logits and probabilities out."""

    datatype, max_values = "FP32", MAX_IMAGES_PER_REQUEST * math.prod(IMAGE_SHAPE)

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *IMAGE_SHAPE]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        classes = len(self.predictor.class_names)
        return [{"name": name, "datatype": "FP32", "shape": [-1, classes]} for name in OUTPUT_NAMES]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        large = any(math.prod(tensor.shape) > INLINE_VALUES for tensor in payload.inputs)
        images = await asyncio.to_thread(images_from, payload) if large else images_from(payload)
        logits, probabilities = await _run(self.batcher, images)
        return _response(self, payload, [_output(OUTPUT_NAMES[0], logits, "FP32"),
                                         _output(OUTPUT_NAMES[1], probabilities, "FP32")])


class ImageModel(ExportModel):
    """Encoded images in, framed as the demo frames them, label and probabilities out. One
    request's images are framed at a time per core: a large image takes hundreds of MB while
    it is framed, and more at once would only share the same cores."""

    datatype, max_values = "BYTES", MAX_FILES_PER_REQUEST

    def __init__(self, name: str, live: ReloadingPredictor, batcher: DynamicBatcher) -> None:
        super().__init__(name, live, batcher)
        self.framing = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="framing")

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": OUTPUT_NAMES[1], "datatype": "FP32", "shape": [-1, len(self.predictor.class_names)]}]

    @staticmethod
    def _files(payload: InferRequest) -> list[bytes]:
        """The request's image files, within the pixel budget by their headers."""
        files = encoded_images_from(payload)
        total = 0
        for index, data in enumerate(files):
            try:
                width, height = open_image(data).size  # the header only
            except ToolkitError as exc:
                raise InvalidInput(f"input {INPUT_NAME!r}[{index}]: {exc}") from None
            total += width * height
        if total > MAX_PIXELS_PER_REQUEST:
            raise InvalidInput(f"the request's images hold {total:,} pixels, more than {MAX_PIXELS_PER_REQUEST:,}; "
                               "send fewer or smaller images per request")
        return files

    @staticmethod
    def _frame(index: int, data: bytes, framing: Framing) -> np.ndarray | None:
        try:
            return preprocess(data, framing)
        except ToolkitError as exc:
            raise InvalidInput(f"input {INPUT_NAME!r}[{index}]: {exc}") from None

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        loop = asyncio.get_running_loop()  # up to 64 MB of base64 and 64 images: off the event loop
        files = await loop.run_in_executor(self.framing, self._files, payload)
        predictor = self.predictor  # one model for the whole request
        digits = await loop.run_in_executor(
            self.framing, lambda: [self._frame(i, data, predictor.framing) for i, data in enumerate(files)])
        found = [i for i, digit in enumerate(digits) if digit is not None]
        classes = predictor.class_names
        probabilities = np.zeros((len(files), len(classes)), dtype=np.float32)
        labels = np.array([""] * len(files), dtype=object)  # "": nothing to classify, predict's null
        if found:
            _, found_probabilities = await _run(self.batcher, np.stack([digits[i] for i in found])[:, None])
            probabilities[found] = found_probabilities
            labels[found] = [classes[k] for k in found_probabilities.argmax(axis=1)]
        return _response(self, payload, [_output("label", labels, "BYTES"),
                                         _output(OUTPUT_NAMES[1], probabilities, "FP32")])


class NotOffered(NotImplementedError):
    """A protocol call this server refuses (501, gRPC UNIMPLEMENTED). KServe's gRPC error
    mapping reads a `reason` that plain NotImplementedError lacks."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReadOnlyRepositoryExtension(ModelRepositoryExtension):
    """KServe's model-repository extension with loading and unloading refused (501): a client
    must not be able to unload the served model."""

    async def load(self, model_name: str) -> None:
        raise NotOffered("models are not loaded or unloaded over the protocol here")

    async def unload(self, model_name: str) -> None:
        raise NotOffered("models are not loaded or unloaded over the protocol here")
