"""Labelled images a user has, in torchvision's ImageFolder layout (`ROOT/<class name>/*.png`),
as the 28x28 inputs a model trains and is evaluated on: each image framed by the demo's
preprocessing, so what is learned from a drawing is what the demo shows the model.

Unreadable files, images with nothing to classify and folders that name no class are reported
(one line each) and left out; they never stop the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.decode import image_files
from toolkit.errors import ToolkitError
from toolkit.framing import MNIST_FRAMING, Framing
from toolkit.preprocess import preprocess


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


def _class_files(root: Path, class_names: list[str]) -> tuple[list[tuple[int, Path]], list[str]]:
    """(label, image file) under `root`, in a stable order, and one line per folder left out."""
    if not root.is_dir():
        raise ToolkitError(f"{root} is not a folder of class folders (ROOT/<class name>/*.png)")
    found, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in class_names:
            problems.append(f"{folder}: not a class of this model ({', '.join(class_names)}); left out")
            continue
        found += [(class_names.index(folder.name), path) for path in image_files([folder])
                  if not path.is_dir()]  # an empty class folder stands for itself
    return found, problems


def image_folder_sha256(root: str | Path, class_names: list[str]) -> str:
    """One sha256 over every image file in the class folders under `root` (name, class and
    content): what a run records about the extra data it trained on, and checks on resume."""
    digest = hashlib.sha256()
    for label, path in _class_files(Path(root), class_names)[0]:
        try:
            content = hashlib.sha256(path.read_bytes()).digest()
        except OSError as exc:
            raise ToolkitError(f"cannot read {path}: {exc.strerror or exc}") from None
        digest.update(f"{class_names[label]}/{path.name}\0".encode() + content)
    return digest.hexdigest()


def read_image_folder(root: str | Path, class_names: list[str], framing: Framing = MNIST_FRAMING) -> LabelledImages:
    """Every image under `root/<class name>/`, framed as `framing` says."""
    root = Path(root)
    found, problems = _class_files(root, class_names)
    pixels, labels, files = [], [], []
    for label, path in found:
        try:
            digit = preprocess(path.read_bytes(), framing)
        except (ToolkitError, OSError) as exc:
            problems.append(f"{path}: {exc}; left out")
            continue
        if digit is None:
            problems.append(f"{path}: nothing to classify in it; left out")
            continue
        pixels.append(np.round(digit * 255).astype(np.uint8))
        labels.append(label)
        files.append(path)
    if not labels:
        raise ToolkitError(f"{root} holds no readable images in class folders named {', '.join(class_names)}"
                           + (f" ({problems[0]})" if problems else ""))
    return LabelledImages(np.stack(pixels), np.array(labels, dtype=np.int64), files, list(class_names),
                          image_folder_sha256(root, class_names), problems)
