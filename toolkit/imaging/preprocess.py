"""From any drawing or image to a 28x28 input framed the way the training data was.

The MNIST authors size-normalized each digit to fit a 20x20 box preserving its aspect ratio,
anti-aliased, and centred it by its centre of mass in a 28x28 field, white ink on black;
Fashion-MNIST scales each item's longer side to 28 and centres its bounding box. Sketchpad
demos that feed a raw canvas to the model skip all of that and guess wrong; this module does
the same steps to every input (a Gradio sketchpad value, a PIL image, a numpy array or an
image file), with the `Framing` measured on the model's training set.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageChops

from toolkit.imaging.decode import working_picture
from toolkit.imaging.framing import FRAME, MNIST_FRAMING, STROKE_SCALE, Framing, stroke_width

COARSE_SIDE = 128  # the ink is first located on a copy about this size
INK_LEVEL = 127  # a pixel counts as ink above this (0 background, 255 full ink)
FAINT_LEVEL = 25  # below this a pixel is paper, not ink
UNEVEN_LEVEL = 24  # paper whose level varies more than this (shadows, gradients) is evened out
BACKGROUND_SIDE = 64  # the paper's level is estimated on a copy about this size
SMOOTH_LEVEL = 4  # light falloff fits a quadratic surface to within this (RMS); objects and shadows do not
MIN_INK_FRACTION = 0.0005  # below this share of the canvas there is nothing to classify
MIN_INK_PIXELS = 4
BORDER_SHARE = 0.03  # the paper's level is read within this share of the picture of its edges
MIN_PART = 0.05  # a separate mark with less ink than this share of the largest one's is a speck
LINE_SPAN = 0.8  # a row (column) inked across this share of the picture may be a ruled line
LINE_THICKNESS = 0.025  # ruled lines are at most this share of the picture thick
MANY_LINES = 4  # this many parallel lines across the picture are ruling, whatever their ink
LINE_FAINT = 0.9  # fewer lines are ruling when their ink is at most this share of the writing's
LINE_PART = 0.3  # a full-resolution row inked across this share of the picture carries part of a line
FRAME_THICKNESS = 0.1  # a box drawn around the subject has sides at most this share of it thick
MIN_FRAMED = 0.3  # ink inside such a box is the subject when it spans this share of the inside
MAX_TILT = 5.0  # degrees: ruled lines in a photo of a page held roughly level
TILT_STEP = 0.5  # a line this far off a tried angle drifts under one row across the reduced copy


def _gray_levels(picture: Image.Image) -> Image.Image:
    """Mode-L levels that ink is read from: darkness over white paper, or a transparent
    canvas's coverage (whatever colour the strokes were drawn in).
    """
    if picture.mode == "L":
        return picture
    if picture.mode != "RGBA":
        return picture.convert("L")
    alpha = picture.getchannel("A")
    if _border_levels(np.asarray(alpha))[0] < 128:  # strokes on a transparent canvas
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


def _border_levels(pixels: np.ndarray, percents: tuple[int, ...] = (50,)) -> list[int]:
    """The border's levels at `percents` (nearest rank, read off a histogram: cheaper than
    sorting): the median is the paper's level."""
    below = np.cumsum(np.bincount(_border(pixels), minlength=256))
    return [int(np.searchsorted(below, max(1, below[-1] * percent // 100 + (percent < 100)))) for percent in percents]


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
        return _spans_across(side[:depth]) and not _spans_across(side[depth : 2 * depth])

    return all(along(side) for side in _four_sides(ink))


def _four_sides(ink: np.ndarray) -> tuple[np.ndarray, ...]:
    """Views of `ink` turned so that each of its sides in turn (top, bottom, left, right) is on top."""
    return ink, ink[::-1], ink.T, ink.T[::-1]


def _spans_across(band: np.ndarray) -> bool:
    """Whether the ink in the rows `band` covers LINE_SPAN of its width, as a line across it does."""
    return np.count_nonzero(band.any(0)) >= LINE_SPAN * band.shape[1]


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
    starts, stops = _runs(profile > 0)
    if not len(starts):
        return None
    mass = np.add.reduceat(profile, starts)  # each run plus the empty gap after it
    thickest = _thickest_line(ink)
    line = np.array([margins and b - a <= thickest and _spans_across(ink[a:b])
                     for a, b in zip(starts, stops, strict=True)])
    if not line.all():
        mass[line] = 0
    kept = np.flatnonzero(mass >= MIN_PART * mass.max())
    return slice(starts[kept[0]], stops[kept[-1]])


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops of the runs of True in the 1-D `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
    return edges[::2], edges[1::2]


def _thickest_line(ink: np.ndarray) -> int:
    """How many rows of `ink` a ruled line may take: LINE_THICKNESS of its height."""
    return max(1, round(LINE_THICKNESS * ink.shape[0]))


def _line_bands(ink: np.ndarray) -> list[tuple[int, int]]:
    """Runs of rows of `ink` inked across LINE_SPAN of its width and at most LINE_THICKNESS of
    its height thick, as (start, stop)."""
    starts, stops = _runs(np.count_nonzero(ink, axis=1) >= LINE_SPAN * ink.shape[1])
    thickest = _thickest_line(ink)
    return [(a, b) for a, b in zip(starts, stops, strict=True) if b - a <= thickest]


def _reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """`pixels` box-averaged `factor` times smaller."""
    return np.asarray(Image.fromarray(pixels).reduce(factor)) if factor > 1 else pixels


def _line_tilt(coarse_ink: np.ndarray) -> float | None:
    """The angle in degrees (counter-clockwise) that levels two or more thin bands crossing the
    picture within MAX_TILT of horizontal, or None. Tried only when some ink spans the width."""
    inked = coarse_ink > 0
    if not _spans_across(inked):
        return None
    angle, level = _levelling_tilt(inked)
    return angle if angle and len(_line_bands(level)) >= 2 else None


def _levelling_tilt(inked: np.ndarray) -> tuple[float, np.ndarray]:
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


def _erase_ruled_lines(pixels: np.ndarray, coarse_ink: np.ndarray, factor: int, paper: int) -> np.ndarray | None:
    """`pixels` with the lines of ruled or squared paper painted over, or None when it has none.

    Lines are found on the reduced copy `coarse_ink` (`factor` times smaller): thin bands across
    the picture, then their exact rows at full resolution. One band is not enough: it may be the
    bar of a 7 drawn across the canvas. Two or three may be the bars of a boxy 2, 3 or 8, so they
    count as ruling only when printed fainter than the writing; MANY_LINES always do. Each line's
    rows are replaced by the fainter of the rows just outside them, so strokes that cross a line
    stay whole.
    """
    erased, table = None, _ink_table(paper)
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
            if _spans_across(ink) and len(rows):
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


def preprocess(image: Any, framing: Framing = MNIST_FRAMING) -> np.ndarray | None:
    """A float32 [28, 28] input in [0, 1] framed as `framing` says (MNIST's by default), or None
    when there is nothing to classify.

    Raises ImageReadError (a ToolkitError) for input that is not an image.
    """
    levels = _gray_levels(working_picture(image))
    pixels = np.asarray(levels)
    low, paper, high = _border_levels(pixels, (5, 50, 95))
    dark_ink = paper > 127
    # A photo (not a drawing or a small crop) whose border is uneven may have light falloff.
    if max(levels.size) >= COARSE_SIDE and high - low > UNEVEN_LEVEL:
        background = _uneven_paper(levels, dark_ink)
        if background is not None:
            pixels = _even_out(pixels, background, dark_ink)
            levels, paper = Image.fromarray(pixels), 255 if dark_ink else 0
    # Find the ink on a reduced copy, then read only that region at full resolution: a few
    # passes over a small image instead of many over a large one. Averaging dims thin strokes
    # and paper noise alike, so the reduced copy's faint level is lower by the same factor.
    factor = max(1, max(levels.size) // COARSE_SIDE)
    reduced = _reduce(pixels, factor)
    coarse_table = _ink_table(paper, FAINT_LEVEL // factor)
    coarse_ink = coarse_table[reduced]
    unlined = _erase_ruled_lines(pixels, coarse_ink, factor, paper)
    tilt = None if unlined is not None else _line_tilt(coarse_ink)
    if tilt is not None:  # a photo of a page not held level: level it, then erase its lines
        level = _rotated(pixels, tilt, paper)
        unlined = _erase_ruled_lines(level, coarse_table[_reduce(level, factor)], factor, paper)
    if unlined is not None:
        pixels = unlined
        coarse_ink = coarse_table[_reduce(pixels, factor)]
    coarse = _subject_box(coarse_ink)
    if coarse is None:
        return None
    framed = _inside_frame(coarse_ink[coarse])
    if framed is None and _loosely_framed(coarse_ink[coarse]):
        tilt, _ = _levelling_tilt(coarse_ink[coarse] > 0)  # a box photographed off level?
        if tilt:
            level = _rotated(pixels, tilt, paper)
            level_ink = coarse_table[_reduce(level, factor)]
            level_box = _subject_box(level_ink)
            framed = None if level_box is None else _inside_frame(level_ink[level_box])
            if framed is not None:
                pixels, coarse_ink, coarse = level, level_ink, level_box
    # A box drawn around the digit (or boxes: a double line) is left out; each is smaller.
    while framed is not None:
        coarse = _within(coarse, framed)
        framed = _inside_frame(coarse_ink[coarse])
    rows, cols = (slice(max(0, (s.start - 1) * factor), (s.stop + 1) * factor) for s in coarse)
    ink = _ink_table(paper)[pixels[rows, cols]]  # one reduced pixel of margin: reduction blurs edges
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


def _rotated(pixels: np.ndarray, degrees: float, paper: int) -> np.ndarray:
    """`pixels` turned `degrees` counter-clockwise about the centre, corners filled with paper."""
    return np.asarray(Image.fromarray(pixels).rotate(degrees, Image.Resampling.BILINEAR, fillcolor=paper))


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


def _uneven_paper(levels: Image.Image, dark_ink: bool) -> np.ndarray | None:
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


def _even_out(pixels: np.ndarray, paper: np.ndarray, dark_ink: bool) -> np.ndarray:
    """Levels as if on even paper (255 under dark ink, 0 under light ink)."""
    pixels, paper = pixels.astype(np.float32), paper.astype(np.float32)
    even = pixels * 255 / np.maximum(paper, 1) if dark_ink else (pixels - paper) * 255 / np.maximum(255 - paper, 1)
    return np.clip(even, 0, 255).astype(np.uint8)


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
