"""Option types, choices and defaults the commands share."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from toolkit.core.formats import FORMATS
from toolkit.training.config import OPTIMIZERS, RECIPES, SCHEDULERS


def _choices(name: str, values: Iterable[str]) -> Any:
    """An Enum for Typer whose members are the library's own names: a new one is one edit there."""
    return Enum(name, {value: value for value in values}, type=str)


Optimizer = _choices("Optimizer", OPTIMIZERS)
Scheduler = _choices("Scheduler", SCHEDULERS)
RecipeName = _choices("RecipeName", RECIPES)


class Device(str, Enum):
    """Where to compute: torch device for training, onnxruntime provider for serving."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


DataDirOption = Annotated[
    Path | None,
    typer.Option(help="Folder with the dataset (torchvision layout or plain IDX files). "
                 "(default: $TOOLKIT_DATA_DIR, else ./data)"),
]


def given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was set by the user rather than left at its default. By the source's
    name: Typer's own copy of click has its own ParameterSource."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")



ExportFormat = _choices("ExportFormat", [*FORMATS, "all"])


RunsDirOption = Annotated[Path, typer.Option(help="Where to look for the newest run.")]
BENCH_DIR = Path("reports")  # where reports a command writes outside an export dir go
ExportDirArgument = Annotated[Path | None, typer.Argument(help="(default: the newest dir under exports/)")]
AtolOption = Annotated[float, typer.Option(min=0, help="Absolute logit tolerance for fp32 backends.")]
RtolOption = Annotated[float, typer.Option(min=0, help="Relative logit tolerance for fp32 backends.")]
AccDropOption = Annotated[
    float, typer.Option(min=0, help="Largest accuracy drop (points) allowed for int8/fp16 models.")
]



ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="Export dir or .onnx file (default: newest under exports/).")
]
ProviderOption = Annotated[Device, typer.Option(help="onnxruntime provider; auto: CUDA when it really loads.")]
ThreadsOption = Annotated[int | None, typer.Option(min=1, help="onnxruntime intra-op threads (default: all cores).")]
IntegrityOption = Annotated[
    bool, typer.Option("--skip-integrity-check",
                       help="Serve a model whose files cannot be proven to match its export's manifest.")
]



JsonOption = Annotated[Path, typer.Option("--json", help="Where to write the results as JSON.")]
