"""From any drawing or image to an MNIST-like digit.

The MNIST authors size-normalized each digit to fit a 20x20 box preserving its aspect ratio,
anti-aliased, and centred it by its centre of mass in a 28x28 field, white ink on black.
Sketchpad demos that feed a raw canvas to the model skip all of that and guess wrong; this
module does the same steps to every input: a Gradio sketchpad value, a PIL image, a numpy
array or an image file.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageSequence, UnidentifiedImageError

from toolkit.errors import ToolkitError

DIGIT_BOX = 20  # longer side of the digit inside the frame
FRAME = 28
MAX_WORKING_SIDE = 1024  # larger inputs are downscaled first: bounded memory and time
COARSE_SIDE = 128  # the ink is first located on a copy about this size
MAX_DECODE_PIXELS = 40_000_000  # refuse to decode more (decompression bombs)
INK_LEVEL = 127  # a pixel counts as ink above this (0 background, 255 full ink)
FAINT_LEVEL = 25  # below this a pixel is paper, not ink
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
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"cannot read this image: it is too large ({exc})") from exc
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


def working_picture(image: Any) -> Image.Image:
    """The input as a PIL image (mode L, RGB or RGBA) no larger than MAX_WORKING_SIDE."""
    picture = to_pil(image)
    if min(picture.size) == 0:
        raise ImageReadError("cannot read this image: it is empty (0 pixels)")
    if max(picture.size) > MAX_WORKING_SIDE:
        picture = picture.copy()
        picture.thumbnail((MAX_WORKING_SIDE, MAX_WORKING_SIDE), Image.Resampling.BOX)
    return picture


def to_pil(image: Any) -> Image.Image:
    """Any supported input as an 8-bit PIL image in mode L, RGB or RGBA."""
    if isinstance(image, dict):
        return to_pil(_sketchpad_image(image))
    if isinstance(image, str | Path | bytes):
        return to_pil(load_image(image))
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_uint8(image))
    if not isinstance(image, Image.Image):
        raise ImageReadError(f"cannot read this image: unsupported input type {type(image).__name__}")
    if image.mode in ("L", "RGB", "RGBA"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image.convert("F"))
        return Image.fromarray(_array_to_uint8(values / max(float(values.max()), 1.0)))
    has_alpha = image.mode in ("LA", "PA", "La", "RGBa") or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB") if image.mode != "1" else image.convert("L")


def _sketchpad_image(value: dict[str, Any]) -> Any:
    """Gradio's ImageEditor/Sketchpad value: `composite`, else `background` with `layers` on top."""
    if value.get("composite") is not None:
        return value["composite"]
    parts = [to_pil(p).convert("RGBA") for p in [value.get("background"), *(value.get("layers") or [])]
             if p is not None]
    if not parts:
        return np.zeros((FRAME, FRAME), dtype=np.uint8)
    canvas = Image.new("RGBA", parts[0].size, (255, 255, 255, 0))
    for part in parts:
        canvas.alpha_composite(part.resize(canvas.size) if part.size != canvas.size else part)
    return canvas


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 1|3|4] or channels-first pixels of any numeric dtype as uint8 [H, W(, C)]."""
    if array.ndim == 4 and array.shape[0] == 1:  # a batch of one
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageReadError(f"cannot read this image: array of shape {list(array.shape)}")
    if min(array.shape[:2]) == 0:
        raise ImageReadError("cannot read this image: it is empty (0 pixels)")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    return (_to_unit_float(array) * 255).round().astype(np.uint8)


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
    if not np.isfinite(array).all():
        raise ImageReadError("cannot read this image: it contains NaN or infinite values")
    scaled = array / 255.0 if array.max(initial=0) > 1.0 else array
    return np.clip(scaled, 0, 1).astype(np.float32)


def _gray_levels(picture: Image.Image) -> Image.Image:
    """Mode-L levels that ink is read from: darkness over white paper, or a transparent
    canvas's coverage (whatever colour the strokes were drawn in).
    """
    if picture.mode == "L":
        return picture
    if picture.mode != "RGBA":
        return picture.convert("L")
    alpha = picture.getchannel("A")
    if _border_median(np.asarray(alpha)) < 128:  # strokes on a transparent canvas
        return alpha
    gray = picture.convert("L")
    if alpha.getextrema()[0] < 255:  # semi-transparent pixels over white paper: darkness scales with opacity
        gray = ImageChops.invert(ImageChops.multiply(ImageChops.invert(gray), alpha))
    return gray


def _border_median(pixels: np.ndarray) -> int:
    """The typical level of the outermost pixels: the paper (or empty canvas)."""
    return int(np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])))


@functools.cache
def _ink_table(paper_level: int, faint_level: int = FAINT_LEVEL) -> np.ndarray:
    """Lookup table from gray level to ink: dark-on-light inverted, the paper's level mapped to 0."""
    levels = np.arange(256)
    if paper_level > 127:  # dark ink on light paper
        levels, paper_level = 255 - levels, 255 - paper_level
    ink = np.clip((levels - paper_level) * 255 // max(255 - paper_level, 1), 0, 255)
    ink[ink <= faint_level] = 0  # paper texture and scanner noise are not ink
    return ink.astype(np.uint8)


def _ink_box(ink: np.ndarray) -> tuple[slice, slice] | None:
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return None if not len(rows) else (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))


def preprocess(image: Any) -> np.ndarray | None:
    """An MNIST-like float32 [28, 28] digit in [0, 1], or None when there is nothing to classify.

    Raises ImageReadError (a ToolkitError) for input that is not an image.
    """
    levels = _gray_levels(working_picture(image))
    pixels = np.asarray(levels)
    paper = _border_median(pixels)
    # Find the ink on a reduced copy, then read only that region at full resolution: a few
    # passes over a small image instead of many over a large one. Averaging dims thin strokes
    # and paper noise alike, so the reduced copy's faint level is lower by the same factor.
    factor = max(1, max(levels.size) // COARSE_SIDE)
    reduced = np.asarray(levels.reduce(factor)) if factor > 1 else pixels
    coarse = _ink_box(_ink_table(paper, FAINT_LEVEL // factor)[reduced])
    if coarse is None:
        return None
    rows, cols = (slice(max(0, (s.start - 1) * factor), (s.stop + 1) * factor) for s in coarse)
    ink = _ink_table(paper)[pixels[rows, cols]]  # one reduced pixel of margin: reduction blurs edges
    if np.count_nonzero(ink > INK_LEVEL) < max(MIN_INK_PIXELS, MIN_INK_FRACTION * pixels.size):
        return None
    # Crop at full resolution; the box includes the anti-aliased fringe, as MNIST's 20x20 box does.
    crop = Image.fromarray(ink[_ink_box(ink)])
    scale = DIGIT_BOX / max(crop.size)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    # Area-average big crops to about 4x the target first (cheap, and it keeps thin strokes),
    # then Lanczos: anti-aliased like MNIST's digits.
    digit = np.asarray(crop.resize(size, Image.Resampling.LANCZOS, reducing_gap=4.0), dtype=np.float32)
    digit /= max(float(digit.max()), 1.0)  # MNIST strokes are saturated
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
