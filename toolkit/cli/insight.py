"""`toolkit evaluate`, `inspect`, `compare` and `models`: reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toolkit.cli import tables
from toolkit.cli.console import console, epoch_progress, err_console
from toolkit.cli.options import (
    DataDirOption,
    Device,
    IntegrityOption,
    ProviderOption,
    RecipeName,
    RunsDirOption,
)
from toolkit.core.locate import newest_run_checkpoint


def evaluate(
    model: Annotated[
        Path | None, typer.Argument(
            help="Checkpoint or run dir, export dir or .onnx file (default: newest run's best.pt).")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Evaluate on another 28x28 10-class dataset.")] = None,
    data_dir: DataDirOption = None,
    out: Annotated[Path | None, typer.Option(help="Report dir (default: reports/RUN_NAME).")] = None,
    provider: ProviderOption = Device.auto,
    runs_dir: RunsDirOption = Path("runs"),
    skip_integrity_check: IntegrityOption = False,
    images: Annotated[Path | None, typer.Option(
        help="Evaluate on these labelled images instead: IMAGES/<class name>/*.png, framed as the demo does.")
    ] = None,
) -> None:
    """Accuracy, per-class precision/recall/F1, confusion.png and mistakes.png for the test set
    (or for a folder of labelled images)."""
    from toolkit.insight.evaluate import evaluate as run_evaluation

    model = model or newest_run_checkpoint(runs_dir)
    with console.status("evaluating..."):
        report_dir, report = run_evaluation(model, out, dataset=dataset, data_dir=data_dir, provider=provider.value,
                                            check_integrity=not skip_integrity_check, images=images)
    for problem in report["problems"]:
        err_console.print(problem, highlight=False)
    console.print(tables.evaluate_table(report))
    if report["integrity"].startswith(("unverified", "not checked")):
        err_console.print(f"note: the model is {report['integrity']}", highlight=False)
    console.print(f"report directory: {report_dir}")


def inspect_command(
    target: Annotated[
        str | None, typer.Argument(
            help="Checkpoint (or a run or export dir) or zoo model name (default: newest run's best.pt).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output dir (default: reports/NAME).")] = None,
    data_dir: DataDirOption = None,
    runs_dir: RunsDirOption = Path("runs"),
) -> None:
    """Layer table, parameters, FLOPs, filters.png and feature_maps.png of a model."""
    from toolkit.insight.inspect_model import inspect_model

    out_dir, report = inspect_model(target or newest_run_checkpoint(runs_dir), out, data_dir=data_dir)
    console.print(tables.inspect_table(report))
    console.print(f"FLOPs per image: {report['flops_per_image']:,}")
    for note in report["notes"]:
        console.print(f"note: {note}")
    console.print(f"inspect directory: {out_dir}")


def compare_command(
    archs: Annotated[list[str], typer.Argument(help="Two or more zoo models, e.g. mlp tinycnn.")],
    epochs: Annotated[int | None, typer.Option(help="Epochs for every model (default: each recipe's).")] = None,
    recipe: Annotated[RecipeName, typer.Option(help="default or notebook recipes.")] = RecipeName.default,
    dataset: Annotated[str, typer.Option(help="Dataset to train and test on.")] = "mnist",
    data_dir: DataDirOption = None,
    limit_train: Annotated[int | None, typer.Option(help="Train on the first N images only.")] = None,
    seed: Annotated[int, typer.Option(help="The same seed for every model.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output dir (default: reports/compare-TIMESTAMP).")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when usable, else CPU.")] = Device.auto,
) -> None:
    """Train models on the same data with the same seed; table and compare.png side by side."""
    from toolkit.insight.compare import compare

    with epoch_progress() as progress:
        out_dir, rows = compare(archs, epochs=epochs, recipe=recipe.value, dataset=dataset, data_dir=data_dir,
                                limit_train=limit_train, seed=seed, out_dir=out, device=device.value,
                                progress=progress, log=console.print)
    console.print(tables.compare_table(rows, archs, dataset))
    console.print(f"compare directory: {out_dir}")



def models() -> None:
    """List the model zoo: name, parameters, description."""
    console.print(tables.models_table())


