"""The one backend factory: every way the models of an export run on this machine, each under
the name parity reports and benchmarks give it. verify compares these backends with PyTorch,
bench times them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.core.formats import FORMATS, Format
from toolkit.runtime.predictor import cuda_provider_usable
from toolkit.runtime.runners import Runner, onnx_runner, torch_runner


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; see docs
        return torch.jit.load(str(path))


def load_program(path: Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()


# How each torch format of the table loads (formats.py stays free of torch).
TORCH_LOADERS: dict[str, Callable[[Path], Callable[[torch.Tensor], Any]]] = {
    "torchscript": load_torchscript, "torch-export": load_program,
}


@dataclass(frozen=True)
class Backend:
    """One runnable model of an export: a torch format, or an onnxruntime one on one provider."""

    name: str
    format: Format
    path: Path
    provider: str | None  # onnxruntime's execution provider; None for a torch format

    def load_module(self) -> Callable[[torch.Tensor], Any]:
        """A torch format's module, loaded from its artifact."""
        return TORCH_LOADERS[self.format.name](self.path)

    def runner(self) -> Runner:
        """This backend as a Runner: the torch module, or the ONNX model in a bare session."""
        if self.provider is None:
            return torch_runner(self.load_module())
        return onnx_runner(self.path, self.provider)


def export_backends(export_dir: Path) -> list[Backend]:
    """Every runnable format present in `export_dir`, in table order: torch formats once,
    onnxruntime ones on every provider usable here (cpu, then cuda)."""
    providers = ["cpu"] + (["cuda"] if cuda_provider_usable() else [])
    found = []
    for fmt in FORMATS.values():
        path = export_dir / fmt.artifact
        if fmt.runtime is None or not path.is_file():
            continue
        if fmt.runtime == "torch":
            found.append(Backend(fmt.backend_name(), fmt, path, None))
        else:
            found += [Backend(fmt.backend_name(provider), fmt, path, provider) for provider in providers]
    return found
