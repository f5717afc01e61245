"""Reading any input as a picture: image files and bytes (header checked before decoding),
Gradio sketchpad values, PIL images and numpy arrays of any dtype and layout; the image files
in folders."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, ImageSequence

from toolkit.core.errors import ToolkitError
from toolkit.imaging.framing import FRAME

MAX_WORKING_SIDE = 1024  # larger inputs are downscaled first: bounded memory and time
MAX_DECODE_PIXELS = 40_000_000  # refuse to decode more (decompression bombs)
# Refuse to read larger files: 40 Mpx uncompressed at 4 bytes a pixel, and room for a header.
# PIL reads every chunk before the pixels (a 3 GB PNG text chunk, say) whole.
MAX_FILE_BYTES = 4 * MAX_DECODE_PIXELS + 2**20


def image_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Each path as given, except that a folder stands for the image files under it, sorted
    (an empty one stays itself, so it is reported rather than silently skipped)."""
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    for path in map(Path, paths):
        found = []
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in readable and p.is_file())
        yield from found or [path]


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """An image as PNG file bytes: a PIL image, or a float array in [0, 1] (as a model sees it)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class ImageReadError(ToolkitError):
    """The input cannot be read as an image."""


def _check_file(status: os.stat_result) -> None:
    """Refuse what is not a regular file (a FIFO or device may never end) or is over MAX_FILE_BYTES."""
    if not stat.S_ISREG(status.st_mode):
        raise ImageReadError("cannot read this image: not a regular file")
    _check_size(status.st_size)


def _check_size(size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise ImageReadError(f"cannot read this image: the file is too big ({size / 2**20:,.0f} MB; "
                             f"limit {MAX_FILE_BYTES / 2**20:,.0f} MB)")


def read_image_file(path: str | Path) -> bytes:
    """A file's bytes, refused before anything is read when it is not a regular file or is
    over MAX_FILE_BYTES (what is checked is the file opened, not the name)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
    except FileNotFoundError:
        raise ImageReadError(f"file not found: {path}") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read this image: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        _check_file(os.fstat(fd))
        try:
            data = fh.read(MAX_FILE_BYTES + 1)  # the file may grow after the check
        except OSError as exc:
            raise ImageReadError(f"cannot read this image: {exc.strerror or exc}") from None
    _check_size(len(data))
    return data


def open_image(source: str | Path | bytes) -> Image.Image:
    """Open an image file (or its bytes) without decoding its pixels: only the header is read,
    and a file over MAX_FILE_BYTES or an image over MAX_DECODE_PIXELS is refused before
    anything decodes it."""
    if isinstance(source, bytes):
        _check_size(len(source))
    else:
        with contextlib.suppress(OSError):  # a file that is not there is reported below
            _check_file(os.stat(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size below
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as exc:
        raise ImageReadError(f"file not found: {source}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"cannot read this image: it is too large ({exc})") from exc
    except Exception as exc:
        raise ImageReadError("cannot read this image: not a supported image file") from exc
    width, height = image.size
    if width * height > MAX_DECODE_PIXELS:
        image.close()
        raise ImageReadError(
            f"cannot read this image: {width}x{height} is too large (limit {MAX_DECODE_PIXELS:,} pixels)"
        )
    return image


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open an image file (or its bytes) safely: size-checked before decoding, first frame only."""
    image = open_image(source)
    try:
        image = next(iter(ImageSequence.Iterator(image)))  # animated: first frame
        image.draft("L", (MAX_WORKING_SIDE, MAX_WORKING_SIDE))  # JPEG: decode at reduced size
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)  # phone photos: stored sideways, with a rotation tag
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read this image: {exc}") from exc
    except Exception as exc:
        raise ImageReadError("cannot read this image: a broken or unsupported image file") from exc
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
