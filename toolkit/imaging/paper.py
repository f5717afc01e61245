"""The paper under the ink: its level, light falling off across a photo, and the lines of ruled
or squared paper, painted over (a page photographed off level is straightened first). What
`toolkit.imaging.preprocess` clears away before it looks for the subject.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageChops

FAINT_LEVEL = 25  # below this a pixel is paper, not ink
UNEVEN_LEVEL = 24  # paper whose level varies more than this (shadows, gradients) is evened out
BACKGROUND_SIDE = 64  # the paper's level is estimated on a copy about this size
SMOOTH_LEVEL = 4  # light falloff fits a quadratic surface to within this (RMS); objects and shadows do not
BORDER_SHARE = 0.03  # the paper's level is read within this share of the picture of its edges
LINE_SPAN = 0.8  # a row (column) inked across this share of the picture may be a ruled line
LINE_THICKNESS = 0.025  # ruled lines are at most this share of the picture thick
MANY_LINES = 4  # this many parallel lines across the picture are ruling, whatever their ink
LINE_FAINT = 0.9  # fewer lines are ruling when their ink is at most this share of the writing's
LINE_PART = 0.3  # a full-resolution row inked across this share of the picture carries part of a line
MAX_TILT = 5.0  # degrees: ruled lines in a photo of a page held roughly level
TILT_STEP = 0.5  # a line this far off a tried angle drifts under one row across the reduced copy


def gray_levels(picture: Image.Image) -> Image.Image:
    """Mode-L levels that ink is read from: darkness over white paper, or a transparent
    canvas's coverage (whatever colour the strokes were drawn in).
    """
    if picture.mode == "L":
        return picture
    if picture.mode != "RGBA":
        return picture.convert("L")
    alpha = picture.getchannel("A")
    if border_levels(np.asarray(alpha))[0] < 128:  # strokes on a transparent canvas
        return alpha
    gray = picture.convert("L")
    if alpha.getextrema()[0] < 255:  # semi-transparent pixels over white paper: darkness scales with opacity
        gray = ImageChops.invert(ImageChops.multiply(ImageChops.invert(gray), alpha))
    return gray


def _border(pixels: np.ndarray) -> np.ndarray:
    """The pixels within BORDER_SHARE of the edges: mostly paper (or empty canvas), even where a
    frame or the box of a form runs along the very edge."""
    k = max(1, round(BORDER_SHARE * min(pixels.shape)))
    if 2 * k >= min(pixels.shape):
        return pixels.ravel()
    sides = (pixels[:k], pixels[-k:], pixels[k:-k, :k], pixels[k:-k, -k:])
    return np.concatenate([side.ravel() for side in sides])


def border_levels(pixels: np.ndarray, percents: tuple[int, ...] = (50,)) -> list[int]:
    """The border's levels at `percents` (nearest rank, read off a histogram: cheaper than
    sorting): the median is the paper's level."""
    below = np.cumsum(np.bincount(_border(pixels), minlength=256))
    return [int(np.searchsorted(below, max(1, below[-1] * percent // 100 + (percent < 100)))) for percent in percents]


@functools.cache
def ink_table(paper_level: int, faint_level: int = FAINT_LEVEL) -> np.ndarray:
    """Lookup table from gray level to ink: dark-on-light inverted, the paper's level mapped to 0."""
    levels = np.arange(256)
    if paper_level > 127:  # dark ink on light paper
        levels, paper_level = 255 - levels, 255 - paper_level
    ink = np.clip((levels - paper_level) * 255 // max(255 - paper_level, 1), 0, 255)
    ink[ink <= faint_level] = 0  # paper texture and scanner noise are not ink
    return ink.astype(np.uint8)


def uneven_paper(levels: Image.Image, dark_ink: bool) -> np.ndarray | None:
    """The paper's level under every pixel when light falls off smoothly across the picture (a
    photo lit from one side, vignetting), else None.

    A closing (an opening for light ink) with a window wider than any stroke wipes out the ink;
    a quadratic surface fitted to what is left is the light. When it does not fit (a solid
    object wider than the window, a hard shadow) the picture is left as it is.
    """
    small = np.asarray(levels.reduce(max(1, max(levels.size) // BACKGROUND_SIDE)))
    window = max(3, max(small.shape) // 4 | 1)
    wipe, restore = (np.max, np.min) if dark_ink else (np.min, np.max)
    paper = _rank_filter(_rank_filter(small, window, wipe), window, restore)
    height, width = paper.shape
    y, x = np.mgrid[-1 : 1 : height * 1j, -1 : 1 : width * 1j]
    terms = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1).reshape(-1, 6)
    coefficients = np.linalg.lstsq(terms, paper.reshape(-1), rcond=None)[0]
    light = (terms @ coefficients).reshape(paper.shape)
    if np.sqrt(np.mean((paper - light) ** 2)) > SMOOTH_LEVEL or np.ptp(np.percentile(light, (5, 95))) <= UNEVEN_LEVEL:
        return None
    light = Image.fromarray(np.clip(light, 1, 255).astype(np.uint8))
    return np.asarray(light.resize(levels.size, Image.Resampling.BILINEAR))


def _rank_filter(pixels: np.ndarray, window: int, reduce: Any) -> np.ndarray:
    """`reduce` (np.max or np.min) over a window x window square around each pixel. The picture is
    extended by point reflection, which continues a gradient across the edge instead of
    flattening it there."""
    padded = np.pad(pixels.astype(np.float32), window // 2, mode="reflect", reflect_type="odd")
    rows = reduce(sliding_window_view(padded, window, axis=0), axis=-1)
    return reduce(sliding_window_view(rows, window, axis=1), axis=-1)


def even_out(pixels: np.ndarray, paper: np.ndarray, dark_ink: bool) -> np.ndarray:
    """Levels as if on even paper (255 under dark ink, 0 under light ink)."""
    pixels, paper = pixels.astype(np.float32), paper.astype(np.float32)
    even = pixels * 255 / np.maximum(paper, 1) if dark_ink else (pixels - paper) * 255 / np.maximum(255 - paper, 1)
    return np.clip(even, 0, 255).astype(np.uint8)


def spans_across(band: np.ndarray) -> bool:
    """Whether the ink in the rows `band` covers LINE_SPAN of its width, as a line across it does."""
    return np.count_nonzero(band.any(0)) >= LINE_SPAN * band.shape[1]


def mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops of the runs of True in the 1-D `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
    return edges[::2], edges[1::2]


def thickest_line(ink: np.ndarray) -> int:
    """How many rows of `ink` a ruled line may take: LINE_THICKNESS of its height."""
    return max(1, round(LINE_THICKNESS * ink.shape[0]))


def _line_bands(ink: np.ndarray) -> list[tuple[int, int]]:
    """Runs of rows of `ink` inked across LINE_SPAN of its width and at most LINE_THICKNESS of
    its height thick, as (start, stop)."""
    starts, stops = mask_runs(np.count_nonzero(ink, axis=1) >= LINE_SPAN * ink.shape[1])
    thickest = thickest_line(ink)
    return [(a, b) for a, b in zip(starts, stops, strict=True) if b - a <= thickest]


def box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """`pixels` box-averaged `factor` times smaller."""
    return np.asarray(Image.fromarray(pixels).reduce(factor)) if factor > 1 else pixels


def line_tilt(coarse_ink: np.ndarray) -> float | None:
    """The angle in degrees (counter-clockwise) that levels two or more thin bands crossing the
    picture within MAX_TILT of horizontal, or None. Tried only when some ink spans the width."""
    inked = coarse_ink > 0
    if not spans_across(inked):
        return None
    angle, level = levelling_tilt(inked)
    return angle if angle and len(_line_bands(level)) >= 2 else None


def levelling_tilt(inked: np.ndarray) -> tuple[float, np.ndarray]:
    """The angle within MAX_TILT (degrees, counter-clockwise) whose row sums of `inked` are most
    uneven, and `inked` sheared level by it (a line that steps between two rows fills both).

    This is the projection-profile method of document deskewing: lines run level, so their
    ink piles up in few rows.
    """
    height, width = inked.shape
    pad = int(np.ceil(width * np.tan(np.radians(MAX_TILT)))) + 1
    padded = np.pad(inked, ((pad, pad), (0, 0)))
    rows, cols = np.arange(height)[:, None] + pad, np.arange(width)
    steps = int(MAX_TILT / TILT_STEP)
    angles = TILT_STEP * np.arange(-steps, steps + 1)
    shifts = np.round(cols * np.tan(np.radians(angles))[:, None]).astype(int)  # [angle, column]
    # Row sums of the picture sheared by every angle, in one pass over the inked pixels of every
    # fourth column: lines run across all of them, and the row sums keep their full resolution.
    ink_rows, ink_cols = np.nonzero(inked[:, ::4])
    ink_cols *= 4
    sheared_rows = ink_rows + pad - shifts[:, ink_cols] + (height + 2 * pad) * np.arange(len(angles))[:, None]
    per_row = np.bincount(sheared_rows.ravel(), minlength=len(angles) * (height + 2 * pad))
    unevenness = np.square(per_row.reshape(len(angles), -1), dtype=np.float64).sum(1)
    best = int(np.argmax(unevenness))
    # Sample each column `shift` rows lower: a line falling at the angle to the right runs level.
    level = padded[rows + shifts[best], cols]
    level[1:] |= level[:-1].copy()
    return float(angles[best]), level


def erase_ruled_lines(pixels: np.ndarray, coarse_ink: np.ndarray, factor: int, paper: int) -> np.ndarray | None:
    """`pixels` with the lines of ruled or squared paper painted over, or None when it has none.

    Lines are found on the reduced copy `coarse_ink` (`factor` times smaller): thin bands across
    the picture, then their exact rows at full resolution. One band is not enough: it may be the
    bar of a 7 drawn across the canvas. Two or three may be the bars of a boxy 2, 3 or 8, so they
    count as ruling only when printed fainter than the writing; MANY_LINES always do. Each line's
    rows are replaced by the fainter of the rows just outside them, so strokes that cross a line
    stay whole.
    """
    erased, table = None, ink_table(paper)
    fainter = np.maximum if paper > 127 else np.minimum  # the less inked of two levels
    for axis in (0, 1):
        bands = _line_bands(coarse_ink if axis == 0 else coarse_ink.T)
        if len(bands) < 2:
            continue
        view = pixels if axis == 0 else pixels.T
        height = len(view)
        lines = []
        for start, stop in bands:
            top = max(0, start * factor - 1)
            ink = table[view[top : min(height, stop * factor + 1)]] > 0
            # The rows that carry part of the line (a levelled line may still slope a little),
            # and one row more on each side: its anti-aliased fringe.
            rows = top + np.flatnonzero(ink.mean(1) >= LINE_PART)
            if spans_across(ink) and len(rows):
                lines.append((max(0, rows[0] - 1), min(height - 1, rows[-1] + 1)))
        if len(lines) < 2 or (len(lines) < MANY_LINES and not _printed_fainter(table[view], lines)):
            continue
        if erased is None:
            erased = pixels.copy()
        view = erased if axis == 0 else erased.T  # a view: painting it paints `erased`
        for first, last in lines:
            view[first : last + 1] = fainter(view[max(0, first - 1)], view[min(height - 1, last + 1)])
    return erased


def _printed_fainter(ink: np.ndarray, lines: list[tuple[int, int]]) -> bool:
    """Whether the rows `lines` (first, last) of `ink` are inked fainter than the rest: ruling
    printed in a light colour beside dark writing, not the bars of a digit."""
    on_line = np.zeros(len(ink), dtype=bool)
    for first, last in lines:
        on_line[first : last + 1] = True
    line_ink, rest = ink[on_line], ink[~on_line]
    line_ink, rest = line_ink[line_ink > 0], rest[rest > 0]
    if not len(line_ink) or not len(rest):
        return False
    return float(np.median(line_ink)) <= LINE_FAINT * float(np.percentile(rest, 90))


def rotated(pixels: np.ndarray, degrees: float, paper: int) -> np.ndarray:
    """`pixels` turned `degrees` counter-clockwise about the centre, corners filled with paper."""
    return np.asarray(Image.fromarray(pixels).rotate(degrees, Image.Resampling.BILINEAR, fillcolor=paper))
