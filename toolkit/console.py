"""Shared rich console and live progress bars for the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def epoch_progress() -> Iterator[Callable[[int, int], Callable[[float, float], None]]]:
    """A factory of per-epoch bars showing running loss and accuracy."""
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )

    def start(epoch: int, total: int) -> Callable[[float, float], None]:
        for task in progress.task_ids:
            progress.remove_task(task)
        task = progress.add_task("train", total=total, epoch=epoch, loss=0.0, acc=0.0)
        state = {"loss": 0.0, "acc": 0.0, "n": 0}

        def update(loss: float, acc: float) -> None:
            state["n"] += 1
            # Running means over the epoch so far, like the notebooks print.
            state["loss"] += (loss - state["loss"]) / state["n"]
            state["acc"] += (acc - state["acc"]) / state["n"]
            progress.update(task, advance=1, loss=state["loss"], acc=state["acc"])

        return update

    with progress:
        yield start
