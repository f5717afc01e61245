"""`toolkit train`."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from toolkit.cli.console import console, epoch_progress
from toolkit.cli.options import (
    DataDirOption,
    Device,
    Optimizer,
    RecipeName,
    Scheduler,
    given,
)
from toolkit.core.errors import Interrupted


def train(
    ctx: typer.Context,
    arch: Annotated[str, typer.Argument(help="Model name from `toolkit models`, e.g. lenet.")],
    dataset: Annotated[str, typer.Option(help="mnist, fashion-mnist, kmnist or emnist-digits.")] = "mnist",
    data_dir: DataDirOption = None,
    recipe: Annotated[
        RecipeName, typer.Option(help="default: fast and accurate; notebook: the classic course setting.")
    ] = RecipeName.default,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: from the recipe).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: from the recipe).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: from the recipe).")] = None,
    optimizer: Annotated[Optimizer | None, typer.Option(help="(default: from the recipe)")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    scheduler: Annotated[Scheduler | None, typer.Option(help="(default: from the recipe)")] = None,
    augment: Annotated[
        bool | None, typer.Option("--augment/--no-augment", help="Random affine + elastic distortion, batched "
                                  "(default: from the recipe).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for weights, data order and augmentation.")] = 0,
    device: Annotated[Device, typer.Option(help="auto: CUDA when usable, else CPU.")] = Device.auto,
    limit_train: Annotated[int | None, typer.Option(help="Train on the first N images only.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories go.")] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Run name (default: ARCH-TIMESTAMP).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue a run dir from its last.pt.")] = None,
    init_from: Annotated[Path | None, typer.Option(
        help="Fine-tune: start from this checkpoint (or run or export dir), with a short recipe.")] = None,
    extra_data: Annotated[Path | None, typer.Option(
        help="Also train on these labelled images: EXTRA/<class name>/*.png, framed as the demo frames them.")
    ] = None,
    extra_weight: Annotated[int | None, typer.Option(
        help="Times each extra image is seen per epoch (default 1).")] = None,
) -> None:
    """Train ARCH and write runs/NAME/ with best.pt, last.pt, metrics.json, curves.png.

    Example: toolkit train lenet --epochs 3 --data-dir ../shared/mnist

    Fine-tune on corrections: toolkit train lenet --init-from runs/lenet --extra-data feedback-images/train
    """
    from toolkit.training.config import make_config, resume_config
    from toolkit.training.train import TrainingInterrupted
    from toolkit.training.train import train as run_training

    if resume is not None:
        settings = {"dataset": dataset, "recipe": recipe.value, "batch_size": batch_size, "lr": lr,
                    "optimizer": optimizer and optimizer.value, "momentum": momentum,
                    "scheduler": scheduler and scheduler.value, "augment": augment, "seed": seed,
                    "limit_train": limit_train, "runs_dir": runs_dir, "name": name, "init_from": init_from,
                    "extra_data": extra_data, "extra_weight": extra_weight}
        # Typer fills in defaults: only what the user typed is held against the run's own settings.
        config = resume_config(resume, arch, epochs=epochs,
                               **{key: value for key, value in settings.items() if given(ctx, key)})
    else:
        config = make_config(
            arch, recipe.value, dataset, epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer.value if optimizer else None, momentum=momentum,
            scheduler=scheduler.value if scheduler else None, seed=seed, augment=augment,
            limit_train=limit_train, init_from=init_from, extra_data=extra_data, extra_weight=extra_weight,
        )
    try:
        with _terminate_as_interrupt(), epoch_progress() as progress:
            result = run_training(
                config, data_dir=data_dir, runs_dir=runs_dir, name=name, device=device.value,
                resume=resume, progress=progress, log=console.print,
            )
    except TrainingInterrupted as exc:
        raise Interrupted(str(exc)) from None
    if result.is_main:
        console.print(
            f"best test accuracy {result.best_test_acc:.2%}, "
            f"{result.train_seconds:.1f}s of training"
        )
        console.print(f"run directory: {result.run_dir}")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """`kill` (SIGTERM) stops a training like Ctrl-C does: finished epochs are kept to resume,
    a run with none is removed, instead of a claimed run dir left behind."""
    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


