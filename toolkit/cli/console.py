"""Shared rich console and live progress bars for the CLI."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

LOG_WIDTH = 120  # the widest table (verify's) is 110 columns


def _console(stderr: bool = False) -> Console:
    """A terminal's own width; LOG_WIDTH in logs and pipes, where rich would cut tables to 80."""
    made = Console(stderr=stderr)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = LOG_WIDTH
    return made


console = _console()
err_console = _console(stderr=True)


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
        if not progress.live.is_started:  # started with the first epoch: an early error prints no blank line
            progress.start()
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

    try:
        yield start
    finally:
        if progress.live.is_started:  # stopping prints a line when output is not a terminal
            progress.stop()
