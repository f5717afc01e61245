"""Labelled images a user has, in torchvision's ImageFolder layout (`ROOT/<class name>/*.png`),
as the 28x28 inputs a model trains and is evaluated on: each image framed by the demo's
preprocessing, so what is learned from a drawing is what the demo shows the model.

A class whose name is not a plain file name (Fashion-MNIST's `T-shirt/top`) has a folder named
by percent-encoding it (`T-shirt%2Ftop`, see `class_folder`; an empty or very long name by a
prefix and a digest): one folder per class, mapped back
to the class exactly. Unreadable files, files over `decode.MAX_FILE_BYTES` (refused before they
are read), images with nothing to classify and folders that name no class are reported (one line
each) and left out; they never stop the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from toolkit.core.errors import ToolkitError
from toolkit.imaging.decode import image_files, read_image_file
from toolkit.imaging.framing import MNIST_FRAMING, Framing
from toolkit.imaging.preprocess import preprocess


@dataclass
class LabelledImages:
    """Framed images `pixels` uint8 [N, 28, 28] with `labels` (class indices) and the `files`
    they came from; `problems` holds one line per file or folder left out."""

    pixels: np.ndarray
    labels: np.ndarray
    files: list[Path]
    class_names: list[str]
    sha256: str  # of the files read and their labels: what a run trained on
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def unit_float(self) -> np.ndarray:
        """float32 [N, 1, 28, 28] in [0, 1], what a Predictor or a torch model takes."""
        return (self.pixels.astype(np.float32) / 255)[:, None]


MAX_FOLDER_BYTES = 255  # a file name on common file systems


def class_folder(name: str) -> str:
    """The folder name of class `name`: the name itself when it is a plain file name, else
    percent-encoded (`T-shirt/top` is `T-shirt%2Ftop`; a leading dot too, so no class hides), so
    that `urllib.parse.unquote` gives the name back. An empty name, or one over 255 bytes once
    encoded, is a readable prefix, `%~` (never in an encoding) and a digest of the name.
    Distinct names always give distinct folders; folders are read back by the class names."""
    folder = quote(name, safe=" ")
    folder = "%2E" + folder[1:] if folder.startswith(".") else folder
    if name and len(folder.encode()) <= MAX_FOLDER_BYTES:
        return folder
    prefix = folder[:200]
    if "%" in prefix[-2:]:  # not half an escape
        prefix = prefix[:prefix.rindex("%")]
    return f"{prefix}%~{hashlib.sha256(name.encode()).hexdigest()[:32]}"


def _class_labels(class_names: list[str]) -> dict[str, int]:
    """Each class folder's name and its class's index (the first, for a name given twice)."""
    labels = {}
    for label, name in enumerate(class_names):
        labels.setdefault(class_folder(name), label)
    return labels


def _class_files(root: Path, class_names: list[str]) -> tuple[list[tuple[int, Path]], list[str]]:
    """(label, image file) under `root`, in a stable order, and one line per folder left out."""
    if not root.is_dir():
        raise ToolkitError(f"{root} is not a folder of class folders (ROOT/<class name>/*.png)")
    labels = _class_labels(class_names)
    found, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in labels:
            problems.append(f"{folder}: not a class folder of this model ({', '.join(labels)}); left out")
            continue
        found += [(labels[folder.name], path) for path in image_files([folder])
                  if not path.is_dir()]  # an empty class folder stands for itself
    return found, problems


def _read_files(root: Path, class_names: list[str], digest: hashlib._Hash,
                problems: list[str]) -> Iterator[tuple[int, Path, bytes]]:
    """(label, file, its bytes) for each image file in the class folders under `root`, each file
    read once; what is read goes into `digest` (name, class and content), what is left out
    (unreadable, too big: refused before it is read) into `problems`."""
    found, left_out = _class_files(root, class_names)
    problems += left_out
    for label, path in found:
        try:
            data = read_image_file(path)
        except ToolkitError as exc:
            problems.append(f"{path}: {exc}; left out")
            continue
        digest.update(f"{class_names[label]}/{path.name}\0".encode() + hashlib.sha256(data).digest())
        yield label, path, data


def image_folder_sha256(root: str | Path, class_names: list[str]) -> str:
    """One sha256 over every image file read in the class folders under `root` (name, class and
    content): what a run records about the extra data it trained on, and checks on resume."""
    digest = hashlib.sha256()
    for _ in _read_files(Path(root), class_names, digest, []):
        pass
    return digest.hexdigest()


def read_image_folder(root: str | Path, class_names: list[str], framing: Framing = MNIST_FRAMING) -> LabelledImages:
    """Every image under `root/<class folder>/`, framed as `framing` says."""
    root = Path(root)
    digest, problems = hashlib.sha256(), []
    pixels, labels, files = [], [], []
    for label, path, data in _read_files(root, class_names, digest, problems):
        try:
            digit = preprocess(data, framing)
        except ToolkitError as exc:
            problems.append(f"{path}: {exc}; left out")
            continue
        if digit is None:
            problems.append(f"{path}: nothing to classify in it; left out")
            continue
        pixels.append(np.round(digit * 255).astype(np.uint8))
        labels.append(label)
        files.append(path)
    if not labels:
        raise ToolkitError(f"{root} holds no readable images in class folders named "
                           f"{', '.join(_class_labels(class_names))}" + (f" ({problems[0]})" if problems else ""))
    return LabelledImages(np.stack(pixels), np.array(labels, dtype=np.int64), files, list(class_names),
                          digest.hexdigest(), problems)
