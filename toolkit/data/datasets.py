"""Dataset registry and in-memory splits.

A whole split is read once into a uint8 tensor; training draws shuffled batches from it on the
training device, so no per-sample transform runs in the hot loop.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.core.classes import DIGITS
from toolkit.core.errors import ToolkitError

DATA_DIR_ENV = "TOOLKIT_DATA_DIR"
OFFLINE_ENV = "TOOLKIT_OFFLINE"
# Where Debian's dataset packages install, e.g. dataset-fashion-mnist: /usr/share/datasets/fashion-mnist.
SYSTEM_DATA_DIRS = (Path("/usr/share/datasets"),)


@dataclass(frozen=True)
class DatasetSpec:
    """A 28x28 grayscale classification dataset that torchvision can download."""

    name: str
    torchvision_class: str
    folder: str  # torchvision's folder under the data dir
    file_prefix: str  # "" for MNIST-style names, e.g. "emnist-digits-" for EMNIST
    test_name: str  # "t10k" for MNIST-style, "test" for EMNIST
    mean: float
    std: float
    class_names: tuple[str, ...]
    transposed: bool = False  # EMNIST stores images transposed relative to MNIST

    def file_names(self, train: bool) -> tuple[str, str]:
        split = "train" if train else self.test_name
        return (
            f"{self.file_prefix}{split}-images-idx3-ubyte",
            f"{self.file_prefix}{split}-labels-idx1-ubyte",
        )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("mnist", "MNIST", "MNIST", "", "t10k", 0.1307, 0.3081, DIGITS),
        DatasetSpec(
            "fashion-mnist", "FashionMNIST", "FashionMNIST", "", "t10k", 0.2860, 0.3530,
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ),
        DatasetSpec(
            "kmnist", "KMNIST", "KMNIST", "", "t10k", 0.1918, 0.3483,
            ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        ),
        DatasetSpec(
            "emnist-digits", "EMNIST", "EMNIST", "emnist-digits-", "test", 0.1733, 0.3317,
            DIGITS, transposed=True,
        ),
    )
}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ToolkitError(
            f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}"
        ) from None


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """`--data-dir`, else $TOOLKIT_DATA_DIR, else ./data."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or "data"
    return Path(data_dir).expanduser()


@dataclass
class Split:
    """A whole split in memory: `images` uint8 [N, 28, 28], `labels` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float images [N, 1, 28, 28] in [0, 1] on `device`."""
        return self.images.to(device).unsqueeze(1).float().div_(255.0)


_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking magic number, shape and length."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ToolkitError(f"cannot read {path}: {exc}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ToolkitError(f"{path} is truncated: {len(raw)} bytes, not an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise ToolkitError(
            f"{path} is not an IDX file of {ndim} dimension(s) (magic number {magic:#010x})"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ToolkitError(
            f"{path} is truncated or corrupt: header says {shape} ({expected} bytes), "
            f"file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_file(roots: list[Path], name: str) -> Path | None:
    for root in roots:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _search_roots(spec: DatasetSpec, data_dir: Path) -> list[Path]:
    # torchvision's layout, or a plain folder of IDX files; then a system-wide copy, if any.
    return [data_dir / spec.folder / "raw", data_dir / "raw", data_dir, *_system_roots(spec)]


def _system_roots(spec: DatasetSpec) -> list[Path]:
    return [system / spec.name for system in SYSTEM_DATA_DIRS]


def _download(spec: DatasetSpec, data_dir: Path) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    kwargs = {"split": "digits"} if spec.torchvision_class == "EMNIST" else {}
    for train in (True, False):
        cls(str(data_dir), train=train, download=True, **kwargs)


def load_split(
    name: str, data_dir: str | Path | None = None, *, train: bool, download: bool = True
) -> Split:
    """Load a whole split of dataset `name` into memory, downloading it when missing.

    Set $TOOLKIT_OFFLINE=1 (or `download=False`) to never touch the network.
    """
    spec = get_dataset(name)
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise ToolkitError(f"data dir {root} is not a directory")
    image_name, label_name = spec.file_names(train)
    roots = _search_roots(spec, root)
    image_path, label_path = _find_file(roots, image_name), _find_file(roots, label_name)
    if image_path is None or label_path is None:
        offline = not download or os.environ.get(OFFLINE_ENV, "") not in ("", "0")
        hint = (
            f"point `data_dir` or ${DATA_DIR_ENV} at a folder holding {image_name} and "
            f"{label_name} (torchvision layout {spec.folder}/raw/ or a plain folder of IDX files)"
        )
        searched = " or ".join(str(where) for where in (root.resolve(), *_system_roots(spec)))
        if offline:
            raise ToolkitError(f"{spec.name} not found under {searched}; {hint}")
        try:
            _download(spec, root)
        except Exception as exc:
            reason = " ".join(str(exc).split())  # torchvision's messages span several lines
            raise ToolkitError(
                f"{spec.name} not found under {searched} and the download failed "
                f"({type(exc).__name__}: {reason}); {hint}"
            ) from exc
        return load_split(name, root, train=train, download=False)
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1)
    if images.shape[1:] != (28, 28):
        raise ToolkitError(f"{image_path} holds {images.shape[1:]} images, expected 28x28")
    if len(images) != len(labels):
        raise ToolkitError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
        )
    if labels.size and int(labels.max()) >= len(spec.class_names):
        raise ToolkitError(f"{label_path} has label {int(labels.max())}, expected < 10")
    image_tensor = torch.from_numpy(images.copy())
    if spec.transposed:
        image_tensor = image_tensor.transpose(1, 2).contiguous()
    return Split(image_tensor, torch.from_numpy(labels.astype(np.int64)))


def shuffled_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Index batches over a fresh permutation; with several ranks, each takes its own shard."""
    order = torch.randperm(n, generator=generator)
    if world_size > 1:
        usable = n - n % world_size  # equal shards keep DDP's collective calls in step
        order = order[rank:usable:world_size]
    yield from order.split(batch_size)
