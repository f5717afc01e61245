"""How a dataset frames its subjects in 28x28 (`Framing`), measured on its training images.

Training, export and the runtime need only this, not the image-cleanup pipeline that applies it
(`toolkit.imaging.preprocess`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from toolkit.core.errors import ToolkitError

FRAME = 28
STROKE_SCALE = 4  # stroke widths are measured with the subject drawn 4x its size in the frame
STROKE_PERCENTILE = 10  # strokes thinner than all but a tenth of the training set's are thickened


@dataclass(frozen=True)
class Framing:
    """How a dataset frames its subjects: the longer side in pixels, what sits at the centre
    (`mass`: the centre of mass, as MNIST; `box`: the bounding box, as Fashion-MNIST), and the
    width of its thinner strokes in frame pixels (thinner input strokes are thickened to it;
    0: never)."""

    box: int = 20
    centre: str = "mass"
    stroke: float = 0.0

    def __post_init__(self) -> None:
        # Strokes are thickened towards `stroke`; near the box's own size that would grow a disc
        # as wide as the drawing (minutes an image), and no dataset's strokes are that wide.
        if not 1 <= self.box <= FRAME or self.centre not in ("mass", "box") or not 0 <= self.stroke <= self.box / 4:
            raise ToolkitError(
                f"invalid framing {self}: box must be 1..{FRAME}, centre 'mass' or 'box', stroke 0..box/4"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Framing:
        """From checkpoint or model metadata; MNIST's framing when absent (older exports)."""
        if not values:
            return MNIST_FRAMING
        try:
            return cls(**values)
        except TypeError:
            raise ToolkitError(
                f"invalid framing {values!r}: expected {{'box': int, 'centre': str, 'stroke': float}}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MNIST_FRAMING = Framing(20, "mass", 1.83)  # what measure_framing finds on MNIST's training set


def measure_framing(images: np.ndarray, sample: int = 10_000) -> Framing:
    """The framing of a set of uint8 [N, 28, 28] images: median longer side of the nonzero
    pixels' box, whichever of centre of mass or box centre sits closer to the frame centre, and
    the stroke width that a tenth of the images (of 2,000) fall below."""
    if len(images) > sample:
        images = images[np.linspace(0, len(images) - 1, sample).astype(int)]
    images = images[images.any((1, 2))]
    widths = [frame_stroke_width(image) for image in images[:2000]]
    images = images.astype(np.float32)
    if not len(images):
        return MNIST_FRAMING
    rows, cols = images.any(2), images.any(1)
    first_row, last_row = rows.argmax(1), FRAME - 1 - rows[:, ::-1].argmax(1)
    first_col, last_col = cols.argmax(1), FRAME - 1 - cols[:, ::-1].argmax(1)
    longest = np.maximum(last_row - first_row, last_col - first_col) + 1
    middle = (FRAME - 1) / 2
    mass = images.sum((1, 2))
    index = np.arange(FRAME)
    mass_offset = np.hypot(images.sum(2) @ index / mass - middle, images.sum(1) @ index / mass - middle)
    box_offset = np.hypot((first_row + last_row) / 2 - middle, (first_col + last_col) / 2 - middle)
    centre = "mass" if np.median(mass_offset) <= np.median(box_offset) else "box"
    stroke = round(float(np.percentile(widths, STROKE_PERCENTILE)), 2)
    return Framing(int(np.median(longest)), centre, stroke)


def stroke_width(pixels: np.ndarray) -> float:
    """The typical width in pixels of the strokes in a [H, W] ink image (0 background): the ink's
    area over half its outline, since a stroke of width w and length L covers w*L pixels and is
    edged by 2*L. Widths under 2 read as 2 (every pixel is an edge)."""
    ink = pixels > pixels.max() / 2
    # Pixels with ink on all four sides; those on the image's border count as edge.
    inside = ink[1:-1, 1:-1] & ink[:-2, 1:-1] & ink[2:, 1:-1] & ink[1:-1, :-2] & ink[1:-1, 2:]
    area = np.count_nonzero(ink)
    edge = area - np.count_nonzero(inside)
    return 2 * area / edge if edge else 0.0


def frame_stroke_width(image: np.ndarray) -> float:
    """Stroke width in frame pixels of a [28, 28] image (uint8, or float in [0, 1]), read at
    STROKE_SCALE times the size where a pixel is no longer a stroke's whole width."""
    pixels = image if image.dtype == np.uint8 else np.clip(image * 255, 0, 255).astype(np.uint8)
    large = Image.fromarray(pixels).resize((FRAME * STROKE_SCALE,) * 2, Image.Resampling.LANCZOS)
    return stroke_width(np.asarray(large)) / STROKE_SCALE
