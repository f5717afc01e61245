"""Digits in styles MNIST's writers never used, made without any MNIST image: hollow (outlined)
digits typeset in the fonts matplotlib ships, and dot-matrix digits as a 5x7 display shows
them, each with its own size, slant, stroke and place on a 200x200 page.

A labelled set the default models get wrong often (docs/benchmarks.md), for measuring what
fine-tuning on a few hundred corrections (`toolkit train --init-from --extra-data`) buys.
"""

from __future__ import annotations

import random
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

from toolkit.core.classes import DIGITS
from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import write_atomic

STYLES = ("hollow", "dots")
PAGE = 200
_DOT_MATRIX = {  # 5x7, as common LED and printer character generators draw the digits
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}


def _fonts() -> list[Path]:
    """matplotlib's text fonts (its symbol and math-extension fonts have no usable digits)."""
    folder = Path(matplotlib.get_data_path(), "fonts", "ttf")
    return sorted(p for p in folder.glob("*.ttf") if p.name.startswith(("DejaVuSans", "DejaVuSerif", "STIXGeneral",
                                                                         "cmr", "cmb", "cmss", "cmtt", "cmti"))
                  and "Display" not in p.name)


def hollow_digit(digit: str, rng: random.Random, fonts: list[Path]) -> Image.Image:
    """`digit` outlined: typeset white on white with a black stroke, turned a little."""
    page = Image.new("L", (PAGE, PAGE), 255)
    font = ImageFont.truetype(str(rng.choice(fonts)), rng.randint(90, 140))
    center = (PAGE / 2 + rng.uniform(-15, 15), PAGE / 2 + rng.uniform(-15, 15))
    ImageDraw.Draw(page).text(center, digit, font=font, fill=255, anchor="mm", stroke_width=rng.randint(2, 5),
                              stroke_fill=0)
    return page.rotate(rng.uniform(-10, 10), fillcolor=255)


def dot_matrix_digit(digit: str, rng: random.Random) -> Image.Image:
    """`digit` as round dots on a 5x7 grid, slanted a little."""
    page = Image.new("L", (PAGE, PAGE), 255)
    draw = ImageDraw.Draw(page)
    pitch = rng.uniform(12, 20)
    radius, slant = pitch * rng.uniform(0.25, 0.45), rng.uniform(-0.2, 0.1)
    left, top = PAGE / 2 - 2 * pitch + rng.uniform(-8, 8), PAGE / 2 - 3 * pitch + rng.uniform(-8, 8)
    for row, bits in enumerate(_DOT_MATRIX[digit]):
        for column, bit in enumerate(bits):
            if bit == "1":
                x, y = left + column * pitch - slant * (row - 3) * pitch, top + row * pitch
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=0)
    return page


def write_styled_digits(out: str | Path, count: int, *, seed: int = 0) -> list[Path]:
    """`count` digits, the classes and styles in turn, as an ImageFolder under `out`
    (`out/<digit>/<style>-<index>.png`); the same seed writes the same files."""
    if count <= 0:
        raise ToolkitError(f"must be positive, got {count}", option="count")
    fonts = _fonts()
    if not fonts:
        raise ToolkitError("matplotlib's fonts are missing; reinstall matplotlib")
    rng = random.Random(seed)
    written = []
    for index in range(count):
        digit, style = DIGITS[index % 10], STYLES[(index // 10) % len(STYLES)]
        page = hollow_digit(digit, rng, fonts) if style == "hollow" else dot_matrix_digit(digit, rng)
        path = Path(out) / digit / f"{style}-{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp, page=page: page.save(tmp, format="PNG"))
        written.append(path)
    return written
