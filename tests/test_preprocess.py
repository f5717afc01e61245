import contextlib
import io
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageDraw, ImageOps

from tests.conftest import FASHION_DIR, run_cli
from toolkit.core.errors import ToolkitError
from toolkit.core.locate import EXAMPLES_DIR
from toolkit.data.datasets import load_split
from toolkit.imaging.decode import MAX_FILE_BYTES, ImageReadError, load_image, read_image_file
from toolkit.imaging.framing import MNIST_FRAMING, Framing, frame_stroke_width, measure_framing
from toolkit.imaging.preprocess import preprocess
from toolkit.runtime.inference import classify
from toolkit.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(export_dir):
    return Predictor(export_dir, provider="cpu")


def _paint(digit, rng, transparent):
    """An MNIST digit drawn as black ink on a large RGBA canvas, somewhere off-centre."""
    scale = int(rng.integers(3, 14))
    size = 28 * scale + int(rng.integers(20, 500))
    canvas = Image.new("RGBA", (size, size + int(rng.integers(0, 200))), (255, 255, 255, 0 if transparent else 255))
    coverage = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC))
    ink = np.zeros((*coverage.shape, 4), np.uint8)
    ink[..., 3] = coverage  # black ink whose opacity is the MNIST intensity
    x = int(rng.integers(0, canvas.width - 28 * scale))
    y = int(rng.integers(0, canvas.height - 28 * scale))
    canvas.alpha_composite(Image.fromarray(ink, "RGBA"), (x, y))
    return canvas


def test_digits_painted_on_large_canvases_come_back_as_their_label(predictor, mnist_dir):
    test = load_split("mnist", mnist_dir, train=False)
    rng = np.random.default_rng(2026)
    chosen = rng.choice(len(test), 300, replace=False)
    correct = total = 0
    for i in chosen:
        for transparent in (True, False):
            canvas = _paint(test.images[i].numpy(), rng, transparent)
            value = np.asarray(canvas) if transparent else canvas  # numpy and PIL inputs
            result = classify(predictor, value)
            total += 1
            correct += result.label == str(int(test.labels[i]))
    assert correct / total >= 0.97, f"{correct}/{total}"


def test_sketchpad_values_old_and_new(predictor, mnist_dir):
    digit = load_split("mnist", mnist_dir, train=False).images[0].numpy()  # a 7
    canvas = np.asarray(_paint(digit, np.random.default_rng(0), transparent=False))
    transparent = np.asarray(_paint(digit, np.random.default_rng(0), transparent=True))
    white = np.full_like(canvas, 255)
    clear = np.zeros_like(canvas)
    for value in (
        {"background": white, "layers": [transparent], "composite": canvas},  # Gradio 5.24+
        {"background": None, "layers": [transparent], "composite": None},  # older: transparent
        {"background": white, "layers": [transparent], "composite": None},
    ):
        assert classify(predictor, value).label == "7"
    assert preprocess({"background": white, "layers": [clear], "composite": white}) is None
    assert preprocess({"background": None, "layers": [], "composite": None}) is None


def test_output_is_an_mnist_like_frame(mnist_dir):
    digit = preprocess(np.asarray(_paint(load_split("mnist", mnist_dir, train=False).images[3].numpy(),
                                         np.random.default_rng(1), transparent=False)))
    assert digit.shape == (28, 28) and digit.dtype == np.float32
    assert digit.min() >= 0.0 and digit.max() == pytest.approx(1.0)
    rows, cols = np.nonzero(digit > 0.1)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 21  # fits the 20 px box
    ys, xs = np.indices(digit.shape)
    com = ((ys * digit).sum() / digit.sum(), (xs * digit).sum() / digit.sum())
    assert abs(com[0] - 13.5) < 1.0 and abs(com[1] - 13.5) < 1.0


@pytest.mark.parametrize(
    "blank",
    [
        np.zeros((400, 400, 4), np.uint8),  # transparent
        np.full((400, 400, 4), 255, np.uint8),  # white, opaque
        np.zeros((400, 400), np.uint8),  # all black
        np.full((300, 500, 3), 255, np.uint8),
        np.ones((1, 1), np.float32),
    ],
)
def test_blank_canvases_have_nothing_to_classify(blank):
    assert preprocess(blank) is None


def test_a_stray_dot_is_nothing_to_classify():
    canvas = np.full((800, 800), 255, np.uint8)
    canvas[400:410, 400:410] = 0
    assert preprocess(canvas) is None


def test_tiny_and_huge_inputs(predictor, mnist_dir):
    seven = 255 - load_split("mnist", mnist_dir, train=False).images[0].numpy()
    tiny = np.asarray(Image.fromarray(seven).resize((14, 14), Image.Resampling.LANCZOS))
    assert classify(predictor, tiny).label == "7"
    huge = Image.fromarray(seven).resize((6000, 6000), Image.Resampling.NEAREST)
    result = classify(predictor, huge)
    assert result.label == "7"


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "P", "LA", "1"])
def test_unusual_image_modes(predictor, mnist_dir, mode):
    seven = Image.fromarray(255 - load_split("mnist", mnist_dir, train=False).images[0].numpy())
    seven = seven.resize((112, 112))
    converted = seven.convert("I").point(lambda v: v * 256).convert("I;16") if mode == "I;16" else seven.convert(mode)
    buffer = io.BytesIO()
    converted.save(buffer, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
    assert classify(predictor, buffer.getvalue()).label == "7"


def test_animated_gif_uses_its_first_frame(predictor, mnist_dir):
    test = load_split("mnist", mnist_dir, train=False)
    frames = [Image.fromarray(255 - test.images[i].numpy()).resize((84, 84)) for i in (0, 1)]  # 7, then 2
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    assert classify(predictor, buffer.getvalue()).label == "7"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"this is not an image", "not a supported image file"),
        (np.full((28, 28), np.nan, np.float32), "NaN"),
        (np.zeros((0, 0), np.uint8), "empty"),
        (np.zeros((4, 28, 28, 2), np.uint8), "array of shape"),
        (object(), "unsupported input type"),
    ],
)
def test_unreadable_inputs_raise_a_clear_error(bad, message):
    with pytest.raises(ImageReadError, match=message):
        preprocess(bad)


def test_truncated_png_and_decompression_bomb(tmp_path):
    good = io.BytesIO()
    Image.new("L", (200, 200), 255).save(good, format="PNG")
    with pytest.raises(ImageReadError, match="cannot read this image"):
        load_image(good.getvalue()[:60])
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000), 1).save(bomb, format="PNG")  # a few KB on disk
    with pytest.raises(ImageReadError, match="too large"):
        load_image(bomb.getvalue())


BROKEN_IMAGES = Path(__file__).parent / "fixtures" / "broken-images"


def _mutated_images(count: int, seed: int = 1):
    """Images in every format Pillow writes here, each with a few bytes changed: what a bounded
    mutation fuzz of the decoders feeds them (deterministic for a seed)."""
    rng = random.Random(seed)
    picture = Image.fromarray((np.random.default_rng(0).random((20, 24)) * 255).astype(np.uint8))
    seeds = {}
    for fmt in ("BMP", "GIF", "ICO", "IM", "MSP", "PCX", "PNG", "PPM", "SGI", "TGA", "TIFF", "WEBP", "XBM",
                "DDS", "JPEG", "QOI", "SPIDER", "PALM", "BLP"):
        mode = "1" if fmt in ("XBM", "MSP", "PALM") else "RGB" if fmt in ("DDS", "BLP") else "L"
        buffer = io.BytesIO()
        with contextlib.suppress(Exception):  # a format this Pillow cannot write is left out
            picture.convert(mode).save(buffer, fmt)
            seeds[fmt] = buffer.getvalue()
    for _ in range(count):
        data = bytearray(seeds[rng.choice(sorted(seeds))])
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        yield bytes(data)


def test_broken_files_of_every_format_are_one_clear_error(tmp_path, quick_export):
    """Pillow's decoders raise whatever their parsers meet (KeyError, TypeError, StopIteration,
    NotImplementedError...): each is `cannot read this image`, never a traceback."""
    broken = sorted(BROKEN_IMAGES.glob("*.bin"))
    assert len(broken) >= 4
    for data in [path.read_bytes() for path in broken] + list(_mutated_images(1500)):
        try:
            preprocess(data)
        except ImageReadError as exc:
            assert str(exc).startswith("cannot read this image"), exc
    result = run_cli("predict", *broken, "--model", quick_export, "--json")
    answers = json.loads(result.stdout)
    assert result.returncode == 1 and all(a["error"].startswith("cannot read this image") for a in answers)
    assert "Traceback" not in result.stderr


def test_files_over_the_size_cap_are_refused_before_they_are_read(tmp_path, quick_export):
    png = io.BytesIO()
    Image.new("L", (28, 28)).save(png, format="PNG")
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:  # a PNG whose 3 GB text chunk Pillow would read whole: sparse, no disk used
        f.write(png.getvalue()[:33] + struct.pack(">I", 3 * 2**30 - 45) + b"tEXt")
        f.truncate(3 * 2**30)
    for read in (load_image, preprocess, read_image_file):
        with pytest.raises(ImageReadError, match=r"too big \(3,072 MB; limit 154 MB\)"):
            read(huge)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image_file(tmp_path / "pipe.png")  # refused, not waited on for a writer
    result = run_cli("predict", huge, "--model", quick_export, "--json")
    assert result.returncode == 1 and "too big" in json.loads(result.stdout)[0]["error"], result.stderr
    assert MAX_FILE_BYTES >= 4 * 40_000_000  # an uncompressed image at the 40 Mpx cap still fits


def test_framing_is_measured_from_the_training_images(mnist_dir):
    # Stroke widths come out of Lanczos resampling: allow for another Pillow's rounding.
    mnist = measure_framing(load_split("mnist", mnist_dir, train=True).images.numpy())
    assert (mnist.box, mnist.centre, mnist.stroke) == (20, "mass", pytest.approx(MNIST_FRAMING.stroke, abs=0.05))
    if FASHION_DIR.exists():
        fashion = measure_framing(load_split("fashion-mnist", FASHION_DIR, train=True).images.numpy())
        assert (fashion.box, fashion.centre, fashion.stroke) == (28, "box", pytest.approx(1.19, abs=0.05))
    assert measure_framing(np.zeros((3, 28, 28), np.uint8)) == MNIST_FRAMING  # nothing to measure


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="Debian package dataset-fashion-mnist")
def test_photos_of_fashion_items_come_back_framed_like_fashion_mnist():
    items = load_split("fashion-mnist", FASHION_DIR, train=False).images[:200].numpy()
    # Photos: each item dark on white paper, 8x larger.
    photos = [Image.fromarray(255 - item).resize((224, 224), Image.Resampling.BICUBIC) for item in items]
    framed = np.stack([preprocess(photo, Framing(28, "box")) for photo in photos])
    as_digits = np.stack([preprocess(photo) for photo in photos])  # MNIST's framing: 20 px, centre of mass
    # What is left is resampling of the fabric texture; the MNIST framing shrinks and shifts every item.
    assert np.abs(framed - items / 255).mean() < 0.07
    assert np.abs(as_digits - items / 255).mean() > 2 * np.abs(framed - items / 255).mean()


def test_a_broken_framing_is_a_clear_error():
    for broken in ({"box": 40, "centre": "mass"}, {"box": 20, "centre": "top"}, {"size": 20},
                   {"box": 20, "centre": "mass", "stroke": -1}):
        with pytest.raises(ToolkitError, match="framing"):
            Framing.from_dict(broken)
    assert Framing.from_dict(None) == MNIST_FRAMING  # exports made before framing was recorded
    assert Framing.from_dict({"box": 20, "centre": "mass"}).stroke == 0  # ... or before strokes were


def _photo(digit, rng, paper_from, paper_to, ink):
    """An 800x800 photo of an MNIST digit: the paper's level falls across the picture (light from
    one side), `ink` is the strokes' level, plus sensor noise."""
    x, y = np.linspace(0, 1, 800)[None, :], np.linspace(0, 1, 800)[:, None]
    paper = paper_from + (paper_to - paper_from) * (0.7 * x + 0.3 * y)
    coverage = np.zeros((800, 800))
    coverage[150:650, 150:650] = np.asarray(Image.fromarray(digit).resize((500, 500), Image.Resampling.BICUBIC)) / 255
    pixels = paper * (1 - coverage) + ink * coverage + rng.normal(0, 3, (800, 800))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("paper_from", "paper_to", "ink"), [(245, 150, 30), (20, 110, 235)],
                         ids=["pencil-on-paper", "chalk-on-board"])
def test_photos_in_uneven_light_are_read_right(predictor, mnist_dir, paper_from, paper_to, ink):
    test = load_split("mnist", mnist_dir, train=False)
    rng = np.random.default_rng(0)
    right = sum(
        classify(predictor, _photo(test.images[i].numpy(), rng, paper_from, paper_to, ink)).label
        == str(int(test.labels[i]))
        for i in range(100)
    )
    # 97/100 for both; assuming one paper level for the whole picture read 29 and 28 of 100.
    assert right >= 90


def _pen_drawing(digit, pen):
    """An MNIST digit redrawn with a `pen` px wide line along its skeleton on a 280x280 page: a
    ballpoint's line, 1/100 of the digit's height where MNIST's strokes are 1/8."""
    from skimage.morphology import dilation, disk, skeletonize

    shape = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BICUBIC)) > 100
    line = dilation(skeletonize(shape), disk(pen // 2))
    return Image.fromarray(np.where(line, 20, 235).astype(np.uint8))


def test_pen_drawings_are_thickened_to_the_training_sets_strokes(predictor, mnist_dir):
    test = load_split("mnist", mnist_dir, train=False)
    drawings = [_pen_drawing(test.images[i].numpy(), pen=3) for i in range(500)]
    labels = test.labels[:500].numpy()
    thin = Framing(20, "mass", stroke=0)  # as before strokes were measured
    seen = {framing: np.stack([preprocess(drawing, framing) for drawing in drawings])
            for framing in (thin, predictor.framing)}
    widths = {framing: np.median([frame_stroke_width(image) for image in inputs]) for framing, inputs in seen.items()}
    assert widths[thin] < predictor.framing.stroke <= widths[predictor.framing]
    right = {framing: (predictor.run(inputs)[0].argmax(1) == labels).mean() for framing, inputs in seen.items()}
    # 2,000 test digits drawn this way: 96.75% right as they came, 97.9% thickened.
    assert right[predictor.framing] >= 0.96
    assert right[predictor.framing] >= right[thin]


def _page(digit, specks=()):
    """An MNIST digit in pencil, 240 px tall, in the middle of a 480x480 page, with dark dots
    (dust, a tap of the pen) at `specks`: (x, y, radius)."""
    page = np.full((480, 480), 240, np.uint8)
    shape = np.asarray(Image.fromarray(digit).resize((240, 240), Image.Resampling.BICUBIC)).astype(int)
    page[120:360, 120:360] = 240 - shape * 220 // 255
    picture = Image.fromarray(page)
    for x, y, radius in specks:
        ImageDraw.Draw(picture).ellipse((x - radius, y - radius, x + radius, y + radius), fill=30)
    return picture


def test_specks_away_from_the_subject_are_left_out(predictor, mnist_dir):
    test = load_split("mnist", mnist_dir, train=False)
    rng = np.random.default_rng(0)
    right = 0
    for i in range(100):
        digit = test.images[i].numpy()
        # 1-3 dots, 1-6 px in radius, anywhere outside the digit's square (with a margin).
        specks = []
        while len(specks) < rng.integers(1, 4):
            x, y = rng.integers(8, 472, 2)
            if not (100 < x < 380 and 100 < y < 380):
                specks.append((x, y, rng.integers(1, 7)))
        seen = preprocess(_page(digit, specks))
        # Left out entirely: a dot in a corner must not shrink the digit.
        assert np.array_equal(seen, preprocess(_page(digit))), (i, specks)
        right += predictor.predict(seen).labels[0] == str(int(test.labels[i]))
    assert right >= 95


def _written_on(page, digit, left, top, side, ink):
    """`page` with an MNIST `digit` written on it `side` px tall at (left, top) in the gray level
    or colour `ink`, as a photo would show it: paper and ink mixed by the digit's coverage."""
    cover = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)) / 255
    pixels = np.asarray(page, dtype=np.float64)
    if pixels.ndim == 3:
        cover = cover[..., None]
    area = pixels[top : top + side, left : left + side]
    area[:] = area * (1 - cover) + np.asarray(ink) * cover
    return Image.fromarray(pixels.round().astype(np.uint8))


def _notebook_page(digit, line_colour, spacing, squared, thickness, tilt=0, margin=None):
    """An MNIST digit written in dark blue ink on a ruled (or squared) notebook page, with a
    `margin` line of that colour if given, photographed `tilt` degrees off level."""
    page = Image.new("RGB", (420, 420), (250, 250, 244))
    draw = ImageDraw.Draw(page)
    if margin:
        draw.line([(50, 0), (50, 419)], fill=margin, width=2)
    for at in range(spacing // 2, 420, spacing):
        draw.line([(0, at), (419, at)], fill=line_colour, width=thickness)
        if squared:
            draw.line([(at, 0), (at, 419)], fill=line_colour, width=thickness)
    page = _written_on(page, digit, 84, 84, 252, (20, 30, 90))
    return page.rotate(tilt, Image.Resampling.BICUBIC, fillcolor=(250, 250, 244)) if tilt else page


@pytest.mark.parametrize(("line_colour", "spacing", "squared", "thickness", "tilt", "margin"), [
    ((150, 180, 230), 40, False, 2, 0, None),  # blue ruled
    ((185, 185, 185), 30, False, 1, 0, None),  # grey ruled
    ((170, 200, 230), 25, True, 1, 0, None),  # squared
    ((150, 180, 230), 40, False, 2, 0, (220, 90, 90)),  # blue ruled with a red margin line
    ((150, 180, 230), 40, False, 2, 2.3, None),  # blue ruled, photographed off level
    ((170, 200, 230), 25, True, 1, -4, None),  # squared, photographed off level
])
def test_digits_on_ruled_and_squared_paper_are_read_right(predictor, mnist_dir, line_colour, spacing, squared,
                                                          thickness, tilt, margin):
    test = load_split("mnist", mnist_dir, train=False)
    right, differences = 0, []
    for i in range(100):
        digit = test.images[i].numpy()
        seen = preprocess(_notebook_page(digit, line_colour, spacing, squared, thickness, tilt, margin))
        plain = preprocess(_notebook_page(digit, (250, 250, 244), spacing, squared, thickness, tilt))
        differences.append(np.abs(seen - plain).mean())
        right += predictor.predict(seen).labels[0] == str(int(test.labels[i]))
    # The lines are gone: level, the model sees what a plain page gives, but for the pixels where
    # a line crossed a stroke; off level, the page is levelled first. With the lines left in, about
    # a third of level pages and half of tilted ones or those with a margin were read right.
    assert right >= 95 and (tilt or np.median(differences) < 0.015), (np.median(differences), right)


def test_a_digit_in_a_forms_box_cropped_at_the_box_is_read_right(predictor, mnist_dir):
    test = load_split("mnist", mnist_dir, train=False)
    right = 0
    for i in range(100):
        cell = Image.new("L", (300, 300), 250)
        ImageDraw.Draw(cell).rectangle([0, 0, 299, 299], outline=100, width=3)  # printed along the edges
        cell = _written_on(cell, test.images[i].numpy(), 60, 60, 180, 20)
        # The paper's level is read from a band along the edges, not the edge pixels (the box):
        # read from those, the page was taken for light ink on dark and 11% were right.
        right += classify(predictor, cell).label == str(int(test.labels[i]))
    assert right >= 95


def _boxed_digit(digit, rng, inverted, tilt):
    """An MNIST digit in dark ink inside a box drawn anywhere on a 400x400 page: 150-300 px wide,
    2-6 px lines of any grey, the digit 50-80% of the box's side and at least 3 px off its sides;
    the page photographed `tilt` degrees off level."""
    page = Image.new("L", (400, 400), 245)
    box, width, level = int(rng.integers(150, 300)), int(rng.integers(2, 7)), int(rng.integers(20, 150))
    x0, y0 = (int(v) for v in rng.integers(5, 395 - box, 2))
    ImageDraw.Draw(page).rectangle([x0, y0, x0 + box, y0 + box], outline=level, width=width)
    side = int(box * rng.uniform(0.5, 0.8))
    dx, dy = (int(v) for v in rng.integers(width + 3, box - side - width - 2, 2))
    page = _written_on(page, digit, x0 + dx, y0 + dy, side, 20).rotate(tilt, Image.Resampling.BICUBIC, fillcolor=245)
    return ImageOps.invert(page) if inverted else page


@pytest.mark.parametrize(("inverted", "tilt"), [(False, 0), (True, 0), (False, 3), (False, -2)],
                         ids=["dark-on-light", "light-on-dark", "3-degrees-off-level", "2-degrees-the-other-way"])
def test_a_box_drawn_around_a_digit_is_left_out(predictor, mnist_dir, inverted, tilt):
    test = load_split("mnist", mnist_dir, train=False)
    rng = np.random.default_rng(0)
    right = sum(classify(predictor, _boxed_digit(test.images[i].numpy(), rng, inverted, tilt)).label
                == str(int(test.labels[i])) for i in range(100))
    # 200 such pages: 98.5% and 97.5% right level, 97.5-98.5% turned 1-3 degrees; framed with
    # their box, 17.5-18.5% (and 11-63% off level when only level boxes were recognised).
    assert right >= 95
    zero = Image.new("L", (300, 300), 255)  # a boxy 0 has nothing inside: it is the subject
    ImageDraw.Draw(zero).rectangle([60, 30, 240, 270], outline=0, width=6)
    seen = preprocess(zero) > 0.5
    strokes = [np.count_nonzero(np.diff(line.astype(int), prepend=0) == 1) for line in (seen[:, 14], seen[14])]
    assert strokes == [2, 2]  # across the middle: both bars, both sides


@pytest.mark.parametrize("segments", ["abged", "abgcd", "abcdefg", "afgcd"])  # a boxy 2, 3, 8 and 5
def test_the_bars_of_boxy_digits_are_not_taken_for_ruled_lines(segments):
    canvas = Image.new("L", (300, 300), 255)
    left, right, top, middle, bottom = 12, 288, 12, 150, 288
    ends = {"a": [(left, top), (right, top)], "b": [(right, top), (right, middle)],
            "c": [(right, middle), (right, bottom)], "d": [(left, bottom), (right, bottom)],
            "e": [(left, middle), (left, bottom)], "f": [(left, top), (left, middle)],
            "g": [(left, middle), (right, middle)]}
    for segment in segments:  # thin bars as wide as the picture: two or three of them
        ImageDraw.Draw(canvas).line(ends[segment], fill=0, width=4)
    seen = preprocess(canvas)
    bars = np.flatnonzero((seen > 0.5).sum(axis=1) >= 12)
    assert len(bars) and np.count_nonzero(np.diff(bars) > 1) + 1 == 3  # top, middle and bottom bars


def test_one_stroke_across_the_canvas_is_not_taken_for_a_ruled_line():
    canvas = Image.new("L", (400, 400), 255)
    draw = ImageDraw.Draw(canvas)
    draw.line([(10, 60), (390, 60)], fill=0, width=4)  # a 7 whose bar spans the canvas
    draw.line([(390, 60), (180, 380)], fill=0, width=4)
    seen = preprocess(canvas)
    assert (seen > 0.5).sum(axis=1).max() >= 15  # the bar is still there, across the 20 px box
    one = Image.new("L", (400, 400), 255)
    ImageDraw.Draw(one).line([(200, 5), (196, 395)], fill=0, width=6)  # a 1 as tall as the canvas
    seen = preprocess(one)
    assert seen is not None and (seen > 0.5).sum(axis=0).max() >= 18


def test_phone_photos_stored_sideways_are_turned_upright(predictor, tmp_path):
    upright = Image.open(EXAMPLES_DIR / "mnist-test-0000-label-7.png").convert("L")
    photo = Image.eval(upright.resize((600, 600), Image.Resampling.BICUBIC), lambda v: 255 - v)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "sideways.jpg"
    photo.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    assert load_image(path).size == (600, 600)
    assert np.abs(np.asarray(load_image(path), dtype=np.float32) - np.asarray(photo)).mean() < 3  # JPEG noise
    assert classify(predictor, path).label == "7"
