"""The checkpoint schema: everything needed to rebuild, evaluate, resume and export a model.

Checkpoints are plain dicts of tensors and primitives, so they load with
`torch.load(weights_only=True)` and never unpickle arbitrary objects.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import write_bytes
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
        with warnings.catch_warnings():  # torch warns about pickle protocols; our own error says what matters
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes fail inside the unpickler in arbitrary ways
        found = isinstance(exc, pickle.UnpicklingError) and re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise ToolkitError(
                f"refusing to load {path}: it holds objects that are not plain weights ({found.group(1)}) "
                f"and could run code when unpickled"
            ) from exc
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported operand" in str(exc):
            raise ToolkitError(f"{path} was saved with a pickle protocol that safe loading cannot read; save it "
                               "with torch.save's default protocol") from exc
        raise ToolkitError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?)") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ToolkitError(f"{path} is not a toolkit checkpoint (no '{FORMAT}' format marker)")
    version = checkpoint.get("format_version", 0)
    if _is_number(version) and version > FORMAT_VERSION:
        raise ToolkitError(
            f"{path} has checkpoint format version {version}; this toolkit reads up to {FORMAT_VERSION}: "
            "upgrade toolkit"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ToolkitError(f"{path} is missing checkpoint fields: {', '.join(missing)}")
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ToolkitError(f"{path} is not a valid toolkit checkpoint: {problem}")
    return checkpoint


# Field -> what it must be; optional fields are checked when present.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "arch": (str,), "model_kwargs": (dict,), "state_dict": (dict,), "dataset": (str,),
    "class_names": (list, tuple), "normalization": (dict,), "framing": (dict, type(None)), "metrics": (dict,),
    "epoch": (int,), "config": (dict,), "optimizer_state": (dict,), "scheduler_state": (dict,),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def checkpoint_problem(checkpoint: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint dict's fields, in one phrase, or None when they are sound."""
    for key, types in _FIELD_TYPES.items():
        if key in checkpoint and (not isinstance(checkpoint[key], types) or isinstance(checkpoint[key], bool)):
            return f"'{key}' is {type(checkpoint[key]).__name__}, expected {' or '.join(t.__name__ for t in types)}"
    if not all(isinstance(k, str) for k in checkpoint["model_kwargs"]):
        return "'model_kwargs' has keys that are not names"
    state = checkpoint["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) and not v.is_complex() for k, v in state.items()):
        return "'state_dict' holds entries that are not named real-valued tensors"
    names = checkpoint["class_names"]
    if not names or not all(isinstance(n, str) for n in names):
        return "'class_names' must be a non-empty list of strings"
    norm = checkpoint["normalization"]
    mean, std = norm.get("mean"), norm.get("std")
    if not (_is_finite(mean) and _is_finite(std) and std > 0):
        return "'normalization' needs a finite 'mean' and a positive 'std'"
    metrics = checkpoint.get("metrics", {})
    history = metrics.get("history", [])
    if not _is_finite(metrics.get("test_acc", 0.0)) or not isinstance(history, list) or not all(
            isinstance(h, dict) and _is_number(h.get("epoch")) and _is_finite(h.get("test_acc")) for h in history):
        return "'metrics' needs a numeric 'test_acc' and a 'history' of epochs with 'epoch' and 'test_acc'"
    return None


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
    arch, kwargs, weights = checkpoint["arch"], checkpoint["model_kwargs"], checkpoint["state_dict"]
    with torch.device("meta"):  # shapes only: odd model_kwargs cannot make it allocate gigabytes
        skeleton = create_model(arch, **kwargs)
    mismatch = _weights_mismatch(skeleton.state_dict(), weights)
    if mismatch:
        raise ToolkitError(f"checkpoint weights do not fit model {arch!r}: {mismatch}")
    model = create_model(arch, **kwargs)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # right shapes, but values that cannot be copied in (complex, ...)
        raise ToolkitError(f"checkpoint weights do not fit model {arch!r}: {' '.join(str(exc).split())}") from exc
    return model.eval()


def _weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """The first tensors that are missing, unexpected or of another shape, named; None if all fit."""
    def named(what: str, names: list[str]) -> str:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return f"{what} {', '.join(names[:3])}{more}"

    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    reshaped = [f"{name} is {list(found[name].shape)} in the checkpoint, {list(tensor.shape)} in the model"
                for name, tensor in expected.items() if name in found and found[name].shape != tensor.shape]
    problems = ([named("missing", missing)] if missing else []) + (
        [named("unexpected", unexpected)] if unexpected else []) + reshaped[:3]
    return "; ".join(problems) or None


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
