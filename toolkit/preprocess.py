"""From any drawing or image to an MNIST-like digit.

The MNIST authors size-normalized each digit to fit a 20x20 box preserving its aspect ratio,
anti-aliased, and centred it by its centre of mass in a 28x28 field, white ink on black.
Sketchpad demos that feed a raw canvas to the model skip all of that and guess wrong; this
module does the same steps to every input: a Gradio sketchpad value, a PIL image, a numpy
array or an image file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from toolkit.errors import ToolkitError

DIGIT_BOX = 20  # longer side of the digit inside the frame
FRAME = 28
MAX_WORKING_SIDE = 1024  # larger inputs are downscaled first: bounded memory and time
MAX_DECODE_PIXELS = 40_000_000  # refuse to decode more (decompression bombs)
INK_LEVEL = 0.5  # a pixel counts as ink above this (0 background, 1 full ink)
FAINT_LEVEL = 0.1  # below this a pixel is paper, not ink
MIN_INK_FRACTION = 0.0005  # below this share of the canvas there is nothing to classify
MIN_INK_PIXELS = 4


class ImageReadError(ToolkitError):
    """The input cannot be read as an image."""


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open an image file (or its bytes) safely: size-checked before decoding, first frame only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size below
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as exc:
        raise ImageReadError(f"file not found: {source}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError("cannot read this image: not a supported image file") from exc
    width, height = image.size
    if width * height > MAX_DECODE_PIXELS:
        raise ImageReadError(
            f"cannot read this image: {width}x{height} is too large (limit {MAX_DECODE_PIXELS:,} pixels)"
        )
    try:
        image = next(iter(ImageSequence.Iterator(image)))  # animated: first frame
        image.draft("L", (MAX_WORKING_SIDE, MAX_WORKING_SIDE))  # JPEG: decode at reduced size
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read this image: {exc}") from exc
    return image


def ink_map(image: Any) -> np.ndarray:
    """Float32 [H, W] with 0 for background and 1 for full ink, whatever the input looked like."""
    if isinstance(image, dict):
        return ink_map(_sketchpad_image(image))
    if isinstance(image, str | Path | bytes):
        return ink_map(load_image(image))
    if isinstance(image, Image.Image):
        return _ink_from_pil(image)
    if isinstance(image, np.ndarray):
        return _ink_from_array(image)
    raise ImageReadError(f"cannot read this image: unsupported input type {type(image).__name__}")


def _sketchpad_image(value: dict[str, Any]) -> Any:
    """Gradio's ImageEditor/Sketchpad value: `composite`, else `background` with `layers` on top."""
    if value.get("composite") is not None:
        return value["composite"]
    parts = [value.get("background"), *(value.get("layers") or [])]
    parts = [_as_rgba(p) for p in parts if p is not None]
    if not parts:
        return np.zeros((FRAME, FRAME), dtype=np.float32)
    canvas = Image.new("RGBA", parts[0].size, (255, 255, 255, 0))
    for part in parts:
        canvas.alpha_composite(part.resize(canvas.size) if part.size != canvas.size else part)
    return canvas


def _as_rgba(part: Any) -> Image.Image:
    if isinstance(part, str | Path):
        part = load_image(part)
    if isinstance(part, np.ndarray):
        part = Image.fromarray(_to_uint8(part))
    return part.convert("RGBA")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    return (np.clip(_to_unit_float(array), 0, 1) * 255).round().astype(np.uint8)


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1] by dtype convention (ints: their range; floats: 0..1 or 0..255)."""
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        top = 255 if array.max(initial=0) <= 255 and info.max > 255 else info.max
        return np.clip(array.astype(np.float32) / top, 0, 1)
    if not np.issubdtype(array.dtype, np.floating):
        raise ImageReadError(f"cannot read this image: unsupported pixel type {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ImageReadError("cannot read this image: it contains NaN or infinite values")
    return array / 255.0 if array.max(initial=0) > 1.0 else np.clip(array, 0, 1)


def _ink_from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4 and array.shape[0] == 1:  # a batch of one
        return _ink_from_array(array[0])
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageReadError(f"cannot read this image: array of shape {list(array.shape)}")
    if min(array.shape[:2]) == 0:
        raise ImageReadError("cannot read this image: it is empty (0 pixels)")
    pixels = _to_unit_float(array)
    if max(pixels.shape[:2]) > MAX_WORKING_SIDE:
        return _ink_from_pil(Image.fromarray(_to_uint8(pixels)))
    if pixels.ndim == 2:
        return _polarize(pixels)
    gray = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if pixels.shape[-1] == 4:
        return _with_alpha(gray, pixels[..., 3])
    return _polarize(gray)


def _ink_from_pil(image: Image.Image) -> np.ndarray:
    if min(image.size) == 0:
        raise ImageReadError("cannot read this image: it is empty (0 pixels)")
    if max(image.size) > MAX_WORKING_SIDE:
        image = image.copy()
        image.thumbnail((MAX_WORKING_SIDE, MAX_WORKING_SIDE), Image.Resampling.BOX)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _ink_from_array(np.asarray(image.convert("F")) / max(float(np.asarray(image).max()), 1.0))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return _with_alpha(gray, rgba[..., 3])
    return _polarize(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)


def _border(values: np.ndarray) -> np.ndarray:
    return np.concatenate([values[0], values[-1], values[:, 0], values[:, -1]])


def _with_alpha(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    if np.median(_border(alpha)) < 0.5:
        # Strokes on a transparent canvas: coverage is the ink, whatever colour it was drawn in.
        return np.clip(alpha, 0, 1).astype(np.float32)
    return _polarize(gray * alpha + (1.0 - alpha))  # composite onto white


def _polarize(gray: np.ndarray) -> np.ndarray:
    """Ink as white on black, with the background level removed."""
    background = float(np.median(_border(gray)))
    if background > 0.5:  # dark ink on light paper
        gray, background = 1.0 - gray, 1.0 - background
    ink = (gray - background) / max(1.0 - background, 1e-3)
    return np.clip(ink, 0, 1).astype(np.float32)


def preprocess(image: Any) -> np.ndarray | None:
    """An MNIST-like float32 [28, 28] digit in [0, 1], or None when there is nothing to classify.

    Raises ImageReadError (a ToolkitError) for input that is not an image.
    """
    ink = ink_map(image)
    mask = ink > INK_LEVEL
    if mask.sum() < max(MIN_INK_PIXELS, MIN_INK_FRACTION * ink.size):
        return None
    ink = np.where(ink > FAINT_LEVEL, ink, 0).astype(np.float32)  # drop faint paper texture
    # The box includes the anti-aliased fringe, as MNIST's 20x20 box does.
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = DIGIT_BOX / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    digit = np.asarray(Image.fromarray(crop, mode="F").resize(size, Image.Resampling.LANCZOS))
    digit = np.clip(digit, 0, None)
    digit /= max(float(digit.max()), 1e-6)  # MNIST strokes are saturated
    return _centre_by_mass(digit)


def _centre_by_mass(digit: np.ndarray) -> np.ndarray:
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    total = digit.sum()
    ys, xs = np.indices(digit.shape)
    com_y, com_x = (ys * digit).sum() / total, (xs * digit).sum() / total
    top = round(float(FRAME / 2 - com_y - 0.5))
    left = round(float(FRAME / 2 - com_x - 0.5))
    # Clip so a lopsided digit still fits entirely in the frame.
    top = min(max(top, 0), FRAME - digit.shape[0])
    left = min(max(left, 0), FRAME - digit.shape[1])
    frame[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return frame
