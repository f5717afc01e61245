"""Corrections people give in the demo, kept as data: one JSON file per example and an
append-only index, then reviewed and exported as labelled images to fine-tune on.

An example holds the drawing as drawn (PNG), the 28x28 the model saw (PNG), the label the
person gave, the model's answer and probabilities, the served model's sha256 and the time;
nothing about the person or the request. Gradio's flagging was not used: its CSV logger keeps
one CSV for all examples, written without a lock shared across processes, and the fields a
fine-tuning run needs (the 28x28, the probabilities, the model's checksum) would be columns of
strings; here each example is a file of its own, written atomically, and the cap is checked
under a lock, so saves from many tabs (or demo processes) lose nothing. A save is all or
nothing: when the index line cannot be written (a full disk), the example file is removed again.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import DIR_MODE, files_together, write_bytes, write_json
from toolkit.data.imagefolder import class_folder
from toolkit.imaging.decode import encode_png, load_image

FORMAT, VERSION = "toolkit-feedback", 1
INDEX = "index.jsonl"
MAX_EXAMPLES = 10_000
MAX_BYTES = 500 * 1024 * 1024
MAX_EXAMPLE_BYTES = 16 * 1024 * 1024  # a drawing of at most 1024x1024 and a 28x28, as PNG in base64
CONTACT_SHEET = 64  # corrected drawings shown in feedback.png
HELDOUT_PERCENT = 50  # of examples, chosen by content: a drawing never moves as the folder grows
STORE_NAME = re.compile(r"[0-9a-f]{32}\.json")  # the files `save` writes (new_example's ids)


@dataclass
class Example:
    """One saved correction or confirmation."""

    id: str
    label: str  # what the person said it is
    predicted: str
    probabilities: dict[str, float]
    model_sha256: str
    time: str
    drawing_png: bytes
    seen_png: bytes

    @property
    def corrected(self) -> bool:
        return self.label != self.predicted

    @property
    def content_sha256(self) -> str:
        """sha256 of the 28x28 pixels the model saw: the same drawing saved again has the same
        one (pixels, not PNG bytes: another Pillow may encode the same pixels differently)."""
        return hashlib.sha256(load_image(self.seen_png).convert("L").tobytes()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "id": self.id, "label": self.label,
                "predicted": self.predicted, "probabilities": self.probabilities,
                "model_sha256": self.model_sha256, "time": self.time,
                "drawing_png": base64.b64encode(self.drawing_png).decode(),
                "seen_png": base64.b64encode(self.seen_png).decode()}

    @classmethod
    def from_json(cls, data: Any) -> Example:
        try:
            if data["format"] != FORMAT or data["version"] != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} example")
            example = cls(str(data["id"]), str(data["label"]), str(data["predicted"]),
                          {str(k): float(v) for k, v in data["probabilities"].items()}, str(data["model_sha256"]),
                          str(data["time"]), base64.b64decode(data["drawing_png"], validate=True),
                          base64.b64decode(data["seen_png"], validate=True))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ToolkitError(f"not a feedback example: {str(exc)[:120]}") from None
        # Labels name folders on export (through class_folder): only the model's own class names will do.
        for field_name in ("label", "predicted"):
            if getattr(example, field_name) not in example.probabilities:
                raise ToolkitError(f"not a feedback example: its {field_name} is not one of its classes")
        load_image(example.drawing_png)  # refuses what is not an image, or too big to decode
        if load_image(example.seen_png).size != (28, 28):
            raise ToolkitError("not a feedback example: what the model saw is not 28x28")
        return example


class FeedbackStore:
    """A folder of examples: `<id>.json` each, and `index.jsonl`, one line per save."""

    def __init__(self, folder: str | Path, *, max_examples: int = MAX_EXAMPLES, max_bytes: int = MAX_BYTES) -> None:
        self.folder, self.max_examples, self.max_bytes = Path(folder), max_examples, max_bytes

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            handle = open(self.folder / ".lock", "a")  # noqa: SIM115  (held for the block)
        except OSError as exc:
            raise ToolkitError(f"cannot write feedback to {self.folder}: {exc.strerror or exc}") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _usage(self) -> tuple[int, int]:
        """How many examples this store wrote, and their bytes: regular files named as `save`
        names them, seen with lstat (a link, a folder or a FIFO named so is not one, and a link
        to a large file counts nothing)."""
        count = size = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                try:
                    if STORE_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                        count, size = count + 1, size + entry.stat(follow_symlinks=False).st_size
                except OSError:  # removed since the listing
                    continue
        return count, size

    def save(self, example: Example) -> Path:
        """Write `example` and add it to the index, both or neither; refused once the folder is full."""
        data = json.dumps(example.to_json()).encode()
        line = json.dumps({"id": example.id, "time": example.time, "label": example.label,
                           "predicted": example.predicted}) + "\n"
        with self._locked():
            try:
                count, size = self._usage()
                if count >= self.max_examples or size + len(data) > self.max_bytes:
                    raise ToolkitError(f"the feedback folder {self.folder} is full ({count:,} examples; limits "
                                       f"{self.max_examples:,} examples, {self.max_bytes // 2**20} MB): review and "
                                       "export it (`toolkit feedback`), then move it away")
                path = write_bytes(self.folder / f"{example.id}.json", data)
                try:
                    _append_whole(self.folder / INDEX, line.encode())
                except OSError:
                    path.unlink()  # no example without its index line: a retry then saves it once
                    raise
            except OSError as exc:  # a full disk, a read-only folder
                raise ToolkitError(f"cannot save feedback to {self.folder}: {exc.strerror or exc}") from None
        return path

    def examples(self) -> tuple[list[Example], list[str]]:
        """Every example in the folder, oldest first, and one line per file that is not one."""
        if not self.folder.is_dir():
            raise ToolkitError(f"no feedback folder at {self.folder}")
        found, problems = [], []
        for path in sorted(self.folder.glob("*.json")):
            try:
                if not path.is_file() or path.stat().st_size > MAX_EXAMPLE_BYTES:
                    raise ToolkitError(f"not a regular file of at most {MAX_EXAMPLE_BYTES // 2**20} MB")
                example = Example.from_json(json.loads(path.read_bytes()))
                if example.id != path.stem:
                    raise ToolkitError(f"its id {example.id!r} is not its file name")
                found.append(example)
            except (ToolkitError, ValueError, OSError, RecursionError) as exc:
                problems.append(f"{path.name}: {exc}; left out")
        return sorted(found, key=lambda e: (e.time, e.id)), problems

    def drop(self, example_id: str) -> None:
        """Remove one example (the index keeps its line: it records what was saved)."""
        ids = {example.id for example in self.examples()[0]}
        if example_id not in ids:
            raise ToolkitError(f"no example {example_id[:80]!r} in {self.folder}")
        with self._locked():
            (self.folder / f"{example_id}.json").unlink()


def _append_whole(path: Path, data: bytes) -> None:
    """Append `data` to the file at `path`, whole or not at all: after a short write (a full
    disk) the file is cut back to its old length, so no half line is left to spoil the next."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        length = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, length)
            raise
    finally:
        os.close(fd)


def new_example(drawing: Image.Image, seen: np.ndarray, label: str, predicted: str,
                probabilities: dict[str, float], model_sha256: str) -> Example:
    return Example(uuid.uuid4().hex, label, predicted, probabilities, model_sha256,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"), encode_png(drawing), encode_png(seen))


def is_heldout(content_sha256: str, percent: int = HELDOUT_PERCENT) -> bool:
    """Whether an example belongs to the held-out part, by its content (`Example.content_sha256`)
    alone: the same drawing saved twice is on one side, the split is stable as the folder grows
    and the same on every machine."""
    return int(content_sha256, 16) % 100 < percent


def summary(examples: list[Example]) -> dict[str, Any]:
    """Examples per class, how often the model was wrong, and which confusions."""
    per_class = Counter(e.label for e in examples)
    wrong = [e for e in examples if e.corrected]
    return {"examples": len(examples), "corrected": len(wrong), "confirmed": len(examples) - len(wrong),
            "wrong_rate": len(wrong) / len(examples) if examples else None,
            "per_class": dict(sorted(per_class.items())),
            "wrong_per_class": dict(sorted(Counter(e.label for e in wrong).items())),
            "confusions": [{"label": label, "predicted": predicted, "count": count} for (label, predicted), count
                           in Counter((e.label, e.predicted) for e in wrong).most_common()],
            "models": dict(Counter(e.model_sha256 for e in examples))}


def export_image_folder(examples: list[Example], out: str | Path,
                        heldout_percent: int = HELDOUT_PERCENT) -> dict[str, int]:
    """The drawings as drawn, in torchvision's ImageFolder layout: `OUT/train/<class>/<id>.png`
    and `OUT/heldout/<class>/<id>.png` (<class> is `imagefolder.class_folder` of the label), split
    by content. An example the model saw exactly as an earlier one with the same label is a
    duplicate (Save clicked again) and left out. Returns the count of each part and of duplicates."""
    if not 0 <= heldout_percent <= 100:
        raise ToolkitError(f"must be between 0 and 100, got {heldout_percent}", option="heldout_percent")
    counts, exported = {"train": 0, "heldout": 0, "duplicates": 0}, set()
    try:
        for example in examples:
            content = example.content_sha256
            if (content, example.label) in exported:
                counts["duplicates"] += 1
                continue
            exported.add((content, example.label))
            part = "heldout" if is_heldout(content, heldout_percent) else "train"
            folder = Path(out) / part / class_folder(example.label)  # checked when the example was read
            folder.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            write_bytes(folder / f"{example.id}.png", example.drawing_png)
            counts[part] += 1
    except OSError as exc:
        raise ToolkitError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return counts


def export_feedback(folder: str | Path, out: str | Path, heldout_percent: int = HELDOUT_PERCENT, *,
                    on_problem: Callable[[str], None] = print) -> dict[str, int]:
    """`toolkit feedback export`: the examples in `folder` into `out`, a new or empty folder
    (`export_image_folder`); each file that is not an example is passed to `on_problem`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ToolkitError(f"{out} exists and is not an empty folder; choose a new folder")
    examples, problems = FeedbackStore(folder).examples()
    for problem in problems:
        on_problem(problem)
    if not examples:
        raise ToolkitError(f"{folder} holds no examples to export")
    return export_image_folder(examples, out, heldout_percent)


def write_review(examples: list[Example], problems: list[str], out: str | Path) -> dict[str, Any]:
    """feedback.json (the summary, the examples without their images, the problems) and
    feedback.png (the corrected drawings as the model saw them, given and predicted labels)."""
    from toolkit.core.plots import plot_digit_grid

    report = {**summary(examples), "problems": problems,
              "items": [{k: v for k, v in e.to_json().items() if not k.endswith("_png")} for e in examples]}
    corrected = [e for e in examples if e.corrected]
    shown = corrected[:CONTACT_SHEET]
    seen = (np.stack([np.asarray(load_image(e.seen_png).convert("L"), dtype=np.float32) / 255 for e in shown])
            if shown else np.zeros((0, 28, 28)))
    with files_together(out) as stage:
        plot_digit_grid(seen, [f"{e.label} (said {e.predicted})\n{e.id[:8]}" for e in shown], stage("feedback.png"),
                        f"corrected drawings, as the model saw them ({len(corrected)} in all): given (model said)")
        write_json(stage("feedback.json"), report)
    return report
