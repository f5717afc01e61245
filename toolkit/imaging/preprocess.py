"""From any drawing or image to a 28x28 input framed the way the training data was.

The MNIST authors size-normalized each digit to fit a 20x20 box preserving its aspect ratio,
anti-aliased, and centred it by its centre of mass in a 28x28 field, white ink on black;
Fashion-MNIST scales each item's longer side to 28 and centres its bounding box. Sketchpad
demos that feed a raw canvas to the model skip all of that and guess wrong; this module does
the same steps to every input (a Gradio sketchpad value, a PIL image, a numpy array or an
image file), with the `Framing` measured on the model's training set. The paper is cleared
away first (`toolkit.imaging.paper`: uneven light, ruled lines); this module then finds the
subject (specks and a box drawn around it left out) and frames it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from toolkit.imaging.decode import working_picture
from toolkit.imaging.framing import FRAME, MNIST_FRAMING, STROKE_SCALE, Framing, stroke_width
from toolkit.imaging.paper import (
    FAINT_LEVEL,
    LINE_SPAN,
    UNEVEN_LEVEL,
    border_levels,
    box_reduce,
    erase_ruled_lines,
    even_out,
    gray_levels,
    ink_table,
    levelling_tilt,
    line_tilt,
    mask_runs,
    rotated,
    spans_across,
    thickest_line,
    uneven_paper,
)

COARSE_SIDE = 128  # the ink is first located on a copy about this size
INK_LEVEL = 127  # a pixel counts as ink above this (0 background, 255 full ink)
MIN_INK_FRACTION = 0.0005  # below this share of the canvas there is nothing to classify
MIN_INK_PIXELS = 4
MIN_PART = 0.05  # a separate mark with less ink than this share of the largest one's is a speck
FRAME_THICKNESS = 0.1  # a box drawn around the subject has sides at most this share of it thick
MIN_FRAMED = 0.3  # ink inside such a box is the subject when it spans this share of the inside


def _ink_box(ink: np.ndarray) -> tuple[slice, slice] | None:
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return None if not len(rows) else (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))


def _subject_box(ink: np.ndarray) -> tuple[slice, slice] | None:
    """The box of the ink that makes up the subject. Marks set apart from it by empty rows or
    columns with under MIN_PART of the heaviest mark's ink (dust, a stray tap of the pen or
    click on the canvas) are left out: one speck in a corner would stretch the box and shrink
    the digit. Reading the row and column sums costs a fraction of labelling the marks."""
    rows, cols = _main_span(ink), _main_span(ink.T, margins=True)
    return None if rows is None or cols is None else (rows, cols)


def _inside_frame(ink: np.ndarray) -> tuple[slice, slice] | None:
    """The inside of a box drawn around the subject, when `ink` (cropped to its marks) is one:
    four thin sides along its edges, an empty gap within them all round, and ink in the middle
    that spans MIN_FRAMED of the inside. A boxy 0 has nothing inside; the bars of a boxy 6, 8
    or 9 touch the sides."""
    sides = []
    for side in _four_sides(ink):
        sides.append(_frame_side(side))
        if sides[-1] is None:  # most subjects fail at the first side
            return None
    top, bottom, left, right = sides
    # One more row or column is the anti-aliased fringe of the side.
    inside = (slice(top + 1, ink.shape[0] - bottom - 1), slice(left + 1, ink.shape[1] - right - 1))
    box = _ink_box(ink[inside])
    if box is None:
        return None
    height, width = ink[inside].shape
    gap = min(box[0].start, box[1].start, height - box[0].stop, width - box[1].stop)
    spans = max((box[0].stop - box[0].start) / height, (box[1].stop - box[1].start) / width)
    if gap < 1 or spans < MIN_FRAMED:
        return None
    return _within(inside, box)


def _within(outer: tuple[slice, slice], inner: tuple[slice, slice]) -> tuple[slice, slice]:
    """The box `inner`, given within the crop `outer`, in the coordinates `outer` is given in."""
    return tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner, strict=True))


def _loosely_framed(ink: np.ndarray) -> bool:
    """Whether ink near each edge of `ink` runs along LINE_SPAN of it, as the sides of a box do
    even off level, and the band within it does not (a solid shape's does): worth the search
    for a tilt that would level the sides."""
    def along(side: np.ndarray) -> bool:
        depth = round(FRAME_THICKNESS * side.shape[0]) + 2
        return spans_across(side[:depth]) and not spans_across(side[depth : 2 * depth])

    return all(along(side) for side in _four_sides(ink))


def _four_sides(ink: np.ndarray) -> tuple[np.ndarray, ...]:
    """Views of `ink` turned so that each of its sides in turn (top, bottom, left, right) is on top."""
    return ink, ink[::-1], ink.T, ink.T[::-1]


def _frame_side(ink: np.ndarray) -> int | None:
    """How many rows thick the side of a box along the top of `ink` is, or None when there is
    none: a run of rows, starting within the first two, each inked across LINE_SPAN of `ink`,
    at most FRAME_THICKNESS of it thick (and a row of fringe)."""
    deepest = max(2, round(FRAME_THICKNESS * min(ink.shape))) + 1
    if len(ink) < deepest + 2:
        return None
    full = np.count_nonzero(ink[: deepest + 2], axis=1) >= LINE_SPAN * ink.shape[1]
    start = 0 if full[0] else 1
    if not full[start]:
        return None
    stop = start + int(np.argmin(full[start:]))
    return stop if start < stop <= deepest else None


def _main_span(ink: np.ndarray, margins: bool = False) -> slice | None:
    """The rows of `ink` from the first to the last run of inked rows that holds at least MIN_PART
    of the heaviest run's ink. With `margins`, a thin run inked across the whole picture beside
    other marks is a ruled line (a notebook's margin), not part of the subject. Only for columns:
    the top bar of a 5 drawn across the canvas may stand apart from the rest of it."""
    profile = ink.sum(1, dtype=np.int64)
    starts, stops = mask_runs(profile > 0)
    if not len(starts):
        return None
    mass = np.add.reduceat(profile, starts)  # each run plus the empty gap after it
    thickest = thickest_line(ink)
    line = np.array([margins and b - a <= thickest and spans_across(ink[a:b])
                     for a, b in zip(starts, stops, strict=True)])
    if not line.all():
        mass[line] = 0
    kept = np.flatnonzero(mass >= MIN_PART * mass.max())
    return slice(starts[kept[0]], stops[kept[-1]])


def preprocess(image: Any, framing: Framing = MNIST_FRAMING) -> np.ndarray | None:
    """A float32 [28, 28] input in [0, 1] framed as `framing` says (MNIST's by default), or None
    when there is nothing to classify.

    Raises ImageReadError (a ToolkitError) for input that is not an image.
    """
    levels = gray_levels(working_picture(image))
    pixels = np.asarray(levels)
    low, paper, high = border_levels(pixels, (5, 50, 95))
    dark_ink = paper > 127
    # A photo (not a drawing or a small crop) whose border is uneven may have light falloff.
    if max(levels.size) >= COARSE_SIDE and high - low > UNEVEN_LEVEL:
        background = uneven_paper(levels, dark_ink)
        if background is not None:
            pixels = even_out(pixels, background, dark_ink)
            levels, paper = Image.fromarray(pixels), 255 if dark_ink else 0
    # Find the ink on a reduced copy, then read only that region at full resolution: a few
    # passes over a small image instead of many over a large one. Averaging dims thin strokes
    # and paper noise alike, so the reduced copy's faint level is lower by the same factor.
    factor = max(1, max(levels.size) // COARSE_SIDE)
    reduced = box_reduce(pixels, factor)
    coarse_table = ink_table(paper, FAINT_LEVEL // factor)
    coarse_ink = coarse_table[reduced]
    unlined = erase_ruled_lines(pixels, coarse_ink, factor, paper)
    tilt = None if unlined is not None else line_tilt(coarse_ink)
    if tilt is not None:  # a photo of a page not held level: level it, then erase its lines
        level = rotated(pixels, tilt, paper)
        unlined = erase_ruled_lines(level, coarse_table[box_reduce(level, factor)], factor, paper)
    if unlined is not None:
        pixels = unlined
        coarse_ink = coarse_table[box_reduce(pixels, factor)]
    coarse = _subject_box(coarse_ink)
    if coarse is None:
        return None
    framed = _inside_frame(coarse_ink[coarse])
    if framed is None and _loosely_framed(coarse_ink[coarse]):
        tilt, _ = levelling_tilt(coarse_ink[coarse] > 0)  # a box photographed off level?
        if tilt:
            level = rotated(pixels, tilt, paper)
            level_ink = coarse_table[box_reduce(level, factor)]
            level_box = _subject_box(level_ink)
            framed = None if level_box is None else _inside_frame(level_ink[level_box])
            if framed is not None:
                pixels, coarse_ink, coarse = level, level_ink, level_box
    # A box drawn around the digit (or boxes: a double line) is left out; each is smaller.
    while framed is not None:
        coarse = _within(coarse, framed)
        framed = _inside_frame(coarse_ink[coarse])
    rows, cols = (slice(max(0, (s.start - 1) * factor), (s.stop + 1) * factor) for s in coarse)
    ink = ink_table(paper)[pixels[rows, cols]]  # one reduced pixel of margin: reduction blurs edges
    if np.count_nonzero(ink > INK_LEVEL) < max(MIN_INK_PIXELS, MIN_INK_FRACTION * pixels.size):
        return None
    # Crop at full resolution; the box includes the anti-aliased fringe, as MNIST's 20x20 box does.
    crop = Image.fromarray(ink[_ink_box(ink)])
    if framing.stroke:
        crop = _thicken(crop, framing)
    size = _scaled_size(crop, framing.box)
    # Area-average big crops to about 4x the target first (cheap, and it keeps thin strokes),
    # then Lanczos: anti-aliased like MNIST's digits.
    digit = np.asarray(crop.resize(size, Image.Resampling.LANCZOS, reducing_gap=4.0), dtype=np.float32)
    digit /= max(float(digit.max()), 1.0)  # MNIST strokes are saturated
    return _place(digit, framing.centre)


def _scaled_size(image: Image.Image, long_side: int) -> tuple[int, int]:
    """`image`'s size scaled so that its longer side is `long_side`, no side under one pixel."""
    scale = long_side / max(image.size)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def _thicken(crop: Image.Image, framing: Framing) -> Image.Image:
    """`crop` (ink on black, cropped to its box) with strokes at least `framing.stroke` wide once
    it is scaled to the frame: a pen line on a photo is a fraction of a pixel there.

    Widths are read with the longer side at STROKE_SCALE times the box, as `measure_framing`
    reads them, and strokes are grown there by a disc, margins included, so the box still holds
    the whole drawing.
    """
    long_side = framing.box * STROKE_SCALE
    if max(crop.size) < long_side:  # too few pixels across a stroke to tell its width
        fine = crop.resize(_scaled_size(crop, long_side), Image.Resampling.LANCZOS)
    else:  # as it is, or box-averaged (cheap) to between 2x and 4x that
        fine = crop.reduce(max(1, max(crop.size) // (2 * long_side)))
    pixels, long_side = np.asarray(fine), max(fine.size)
    target = framing.stroke * long_side / framing.box
    width = stroke_width(pixels)
    if width >= target:
        return crop
    # Growing by r on each side widens strokes by 2r and the box by 2r; solve for the ratio.
    radius = round((target - width) / (2 * (1 - target / long_side)))
    return Image.fromarray(_dilate(pixels, radius)) if radius >= 1 else crop


def _dilate(pixels: np.ndarray, radius: int) -> np.ndarray:
    """Gray-level dilation by a disc of `radius`, the image grown by `radius` on every side."""
    height, width = pixels.shape
    padded = np.pad(pixels, 2 * radius)
    grown = np.zeros((height + 2 * radius, width + 2 * radius), dtype=pixels.dtype)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius + radius:  # a rounder disc than r*r at small r
                window = padded[radius + dy : radius + dy + grown.shape[0], radius + dx : radius + dx + grown.shape[1]]
                np.maximum(grown, window, out=grown)
    return grown


def _place(digit: np.ndarray, centre: str) -> np.ndarray:
    """`digit` in a 28x28 frame, its centre of mass or its box centre at the frame's centre."""
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    if centre == "mass":
        total = digit.sum()
        ys, xs = np.indices(digit.shape)
        middle_y, middle_x = (ys * digit).sum() / total, (xs * digit).sum() / total
    else:
        middle_y, middle_x = (digit.shape[0] - 1) / 2, (digit.shape[1] - 1) / 2
    top = round(float(FRAME / 2 - middle_y - 0.5))
    left = round(float(FRAME / 2 - middle_x - 0.5))
    # Clip so a lopsided digit still fits entirely in the frame.
    top = min(max(top, 0), FRAME - digit.shape[0])
    left = min(max(left, 0), FRAME - digit.shape[1])
    frame[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return frame
