"""The checkpoint schema: everything needed to rebuild, evaluate, resume and export a model.

Checkpoints are plain dicts of tensors and primitives, so they load with
`torch.load(weights_only=True)` and never unpickle arbitrary objects.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.errors import ToolkitError
from toolkit.fileio import write_bytes
from toolkit.models import create_model

FORMAT = "toolkit-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("arch", "model_kwargs", "state_dict", "dataset", "class_names", "normalization")


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (temp file + rename): a killed run leaves no broken file."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}, buffer)
    return write_bytes(path, buffer.getvalue())


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint a path names: a run dir stands for its best.pt, an export dir for its model.pt."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("best.pt", "model.pt"):
        if (path / name).is_file():
            return path / name
    raise ToolkitError(f"{path} is a folder with no checkpoint in it (best.pt of a run or model.pt of an "
                       f"export); pass a checkpoint file")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a toolkit checkpoint (a run or export dir stands for its checkpoint),
    with a clear error for anything else."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise ToolkitError(f"checkpoint not found: {path}")
    other = _other_artifact(path)
    if other:
        raise ToolkitError(f"{path} is {other}, not a training checkpoint; pass the best.pt that `toolkit train` "
                           f"wrote (runs/NAME/best.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes fail inside the unpickler in arbitrary ways
        found = isinstance(exc, pickle.UnpicklingError) and re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise ToolkitError(
                f"refusing to load {path}: it holds objects that are not plain weights ({found.group(1)}) "
                f"and could run code when unpickled"
            ) from exc
        raise ToolkitError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?)") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ToolkitError(f"{path} is not a toolkit checkpoint (no '{FORMAT}' format marker)")
    if checkpoint.get("format_version", 0) > FORMAT_VERSION:
        raise ToolkitError(
            f"{path} has checkpoint format version {checkpoint['format_version']}; this toolkit "
            f"reads up to {FORMAT_VERSION}: upgrade toolkit"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ToolkitError(f"{path} is missing checkpoint fields: {', '.join(missing)}")
    return checkpoint


def _other_artifact(path: Path) -> str | None:
    """What `path` is when it is one of the other files the toolkit writes, else None."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                entries = {name.partition("/")[2] for name in archive.namelist()}
        except (zipfile.BadZipFile, OSError):
            return None
        if "constants.pkl" in entries:
            return "a TorchScript program"
        if "archive_format" in entries:
            return "a torch.export program"
    return "an ONNX model" if path.suffix == ".onnx" else None


def build_model(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the bare network (normalized input -> logits) in eval mode."""
    model = create_model(checkpoint["arch"], **checkpoint["model_kwargs"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ToolkitError(
            f"checkpoint weights do not fit model {checkpoint['arch']!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.eval()


class DeployableModel(nn.Module):
    """The serving contract: `image` [N,1,28,28] pixels in [0, 1] -> (`logits`, `probabilities`).

    The training normalization is part of the module, so no client needs mean and std.
    """

    def __init__(self, network: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.network((image - self.mean) / self.std)
        return logits, torch.softmax(logits, dim=1)


def build_deployable(checkpoint: dict[str, Any]) -> DeployableModel:
    """The checkpoint's model wrapped with its normalization and softmax, in eval mode."""
    norm = checkpoint["normalization"]
    return DeployableModel(build_model(checkpoint), norm["mean"], norm["std"]).eval()


def newest_run_checkpoint(runs_dir: str | Path = "runs", name: str = "best.pt") -> Path:
    """`best.pt` of the most recently modified run under `runs_dir`."""
    runs_dir = Path(runs_dir)
    candidates = sorted(runs_dir.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ToolkitError(
            f"no checkpoint found under {runs_dir}/*/{name}; train one with `toolkit train lenet` "
            f"or pass a checkpoint path"
        )
    return candidates[-1]
