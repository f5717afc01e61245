"""The `toolkit` command line: a thin layer that parses options and calls one function each."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from toolkit.console import console, epoch_progress, err_console
from toolkit.errors import ToolkitError

app = typer.Typer(
    name="toolkit",
    help="Train small vision models on MNIST-like data, export them with proven parity, serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Optimizer(str, Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"
    adadelta = "adadelta"


class Scheduler(str, Enum):
    onecycle = "onecycle"
    step = "step"
    none = "none"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class RecipeName(str, Enum):
    default = "default"
    notebook = "notebook"


DataDirOption = Annotated[
    Path | None,
    typer.Option(help="Folder with the dataset (torchvision layout or plain IDX files). "
                 "[default: $TOOLKIT_DATA_DIR, else ./data]"),
]


@app.command()
def train(
    arch: Annotated[str, typer.Argument(help="Model name from `toolkit models`, e.g. lenet.")],
    dataset: Annotated[str, typer.Option(help="mnist, fashion-mnist, kmnist or emnist-digits.")] = "mnist",
    data_dir: DataDirOption = None,
    recipe: Annotated[
        RecipeName, typer.Option(help="default: fast and accurate; notebook: the classic course setting.")
    ] = RecipeName.default,
    epochs: Annotated[int | None, typer.Option(help="Epochs [default: from the recipe].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size [default: from the recipe].")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate [default: from the recipe].")] = None,
    optimizer: Annotated[Optimizer | None, typer.Option(help="[default: from the recipe]")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    scheduler: Annotated[Scheduler | None, typer.Option(help="[default: from the recipe]")] = None,
    augment: Annotated[bool, typer.Option(help="Random affine + elastic distortion, batched.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for weights, data order and augmentation.")] = 0,
    device: Annotated[Device, typer.Option(help="auto: CUDA when usable, else CPU.")] = Device.auto,
    limit_train: Annotated[int | None, typer.Option(help="Train on the first N images only.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories go.")] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Run name [default: ARCH-TIMESTAMP].")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue a run dir from its last.pt.")] = None,
) -> None:
    """Train ARCH and write runs/NAME/ with best.pt, last.pt, metrics.json, curves.png.

    Example: toolkit train lenet --epochs 3 --data-dir ../shared/mnist
    """
    from toolkit.train import load_resume_state, make_config
    from toolkit.train import train as run_training

    if resume is not None:
        _, _, config = load_resume_state(resume)
        if epochs is not None:
            config.epochs = epochs
    else:
        config = make_config(
            arch, recipe.value, dataset, epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer.value if optimizer else None, momentum=momentum,
            scheduler=scheduler.value if scheduler else None, seed=seed, augment=augment,
            limit_train=limit_train,
        )
    with epoch_progress() as progress:
        result = run_training(
            config, data_dir=data_dir, runs_dir=runs_dir, name=name, device=device.value,
            resume=resume, progress=progress, log=console.print,
        )
    if result.is_main:
        console.print(
            f"best test accuracy {result.best_test_acc:.2%}, "
            f"{result.train_seconds:.1f}s of training"
        )
        console.print(f"run directory: {result.run_dir}")


@app.command()
def models() -> None:
    """List the model zoo: name, parameters, description."""
    from rich.table import Table

    from toolkit.models import count_parameters, create_model, get_entry, list_models

    table = Table(title="model zoo")
    table.add_column("name", style="bold")
    table.add_column("parameters", justify="right")
    table.add_column("description")
    for name in list_models():
        table.add_row(name, f"{count_parameters(create_model(name)):,}", get_entry(name).description)
    console.print(table)


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit 1."""
    try:
        app()
    except ToolkitError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
