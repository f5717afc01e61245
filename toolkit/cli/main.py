"""The `toolkit` command line: a thin layer that parses options and calls one function each."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from toolkit.cli.console import console, epoch_progress, err_console
from toolkit.core.errors import Interrupted, ToolkitError
from toolkit.core.formats import ALL, FORMATS
from toolkit.core.locate import EXAMPLES_DIR, newest_export_dir, newest_run_checkpoint
from toolkit.serving.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS
from toolkit.training.config import OPTIMIZERS, RECIPES, SCHEDULERS

if TYPE_CHECKING:
    from toolkit.export.verify import ParityReport

app = typer.Typer(
    name="toolkit",
    help="Train small vision models on MNIST-like data, export them with proven parity, serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_versions(requested: bool) -> None:
    if requested:
        from toolkit import library_versions

        versions = library_versions("torchvision", "onnx", "onnxruntime-gpu", "onnxruntime", "gradio")
        toolkit_version = versions.pop("toolkit")
        installed = ", ".join(f"{name} {v}" for name, v in versions.items() if v != "not installed")
        typer.echo(f"toolkit {toolkit_version} ({installed})")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_versions, is_eager=True,
        help="Print the versions of toolkit and the libraries it runs on, and exit.")] = False,
) -> None:
    """Train small vision models on MNIST-like data, export them with proven parity, serve them."""


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


# Options a resumed run does not take (it keeps its own settings); Typer gives each a value, so
# whether the user typed one is asked of the parser.
FIXED_ON_RESUME = ("dataset", "recipe", "batch_size", "lr", "optimizer", "momentum", "scheduler", "augment", "seed",
                   "limit_train", "runs_dir", "name", "init_from", "extra_data", "extra_weight")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was set by the user rather than left at its default. By the source's
    name: Typer's own copy of click has its own ParameterSource."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@app.command()
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
        given = {name: True for name in FIXED_ON_RESUME if _given(ctx, name)}
        config = resume_config(resume, arch, epochs=epochs, **given)
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


ExportFormat = _choices("ExportFormat", [*FORMATS, "all"])


RunsDirOption = Annotated[Path, typer.Option(help="Where to look for the newest run.")]
BENCH_DIR = Path("reports")  # where reports a command writes outside an export dir go
ExportDirArgument = Annotated[Path | None, typer.Argument(help="(default: the newest dir under exports/)")]
AtolOption = Annotated[float, typer.Option(min=0, help="Absolute logit tolerance for fp32 backends.")]
RtolOption = Annotated[float, typer.Option(min=0, help="Relative logit tolerance for fp32 backends.")]
AccDropOption = Annotated[
    float, typer.Option(min=0, help="Largest accuracy drop (points) allowed for int8/fp16 models.")
]


@app.command()
def export(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="A checkpoint, or a run dir for its best.pt (default: best.pt of the "
                                    "newest run under --runs-dir).")
    ] = None,
    format: Annotated[ExportFormat, typer.Option(
        "--format", "-f", help=f"What to write: one format, or all ({', '.join(ALL)}).")] = ExportFormat.onnx,
    out: Annotated[Path | None, typer.Option(help="Export dir (default: exports/RUN_NAME).")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    quantize: Annotated[str | None, typer.Option(help="'int8': also write a static QDQ model.int8.onnx.")] = None,
    fp16: Annotated[bool, typer.Option(help="Also write model.fp16.onnx.")] = False,
    verify: Annotated[bool, typer.Option(help="Check parity before replacing the previous export.")] = True,
    atol: AtolOption = 1e-5,
    rtol: RtolOption = 1e-4,
    max_acc_drop: AccDropOption = 0.3,
    data_dir: DataDirOption = None,
    runs_dir: RunsDirOption = Path("runs"),
) -> None:
    """Export a checkpoint to ONNX / TorchScript / torch.export / Triton and prove parity.

    Example: toolkit export runs/lenet-demo/best.pt --format all --quantize int8
    """
    from toolkit.export.publish import export_verified
    from toolkit.export.writers import ExportOptions
    from toolkit.models.checkpoint import checkpoint_file

    if checkpoint is None:
        checkpoint = newest_run_checkpoint(runs_dir)
        console.print(f"using the newest run's checkpoint: {checkpoint}")
    checkpoint = checkpoint_file(checkpoint)
    out = out or Path("exports") / checkpoint.resolve().parent.name
    options = ExportOptions(
        formats=(format.value,), opset=opset, quantize=quantize, fp16=fp16, data_dir=data_dir,
        command=" ".join(["toolkit", *sys.argv[1:]]),
    )
    with console.status("exporting...") as status:

        def list_artifacts(manifest: dict[str, Any]) -> None:
            for name, info in manifest["artifacts"].items():
                console.print(f"  wrote {name:<36} {info['bytes']:>12,} bytes  sha256 {info['sha256'][:16]}")
            status.update("verifying...")

        export_verified(checkpoint, out, options, verify=verify, atol=atol, rtol=rtol, max_acc_drop=max_acc_drop,
                        on_exported=list_artifacts, on_verified=_show_parity,
                        progress=lambda name: status.update(f"verifying {name}..."))
    console.print(f"export directory: {out}")


@app.command("verify")
def verify_command(
    export_dir: ExportDirArgument = None,
    atol: AtolOption = 1e-5,
    rtol: RtolOption = 1e-4,
    max_acc_drop: AccDropOption = 0.3,
    data_dir: DataDirOption = None,
    endpoint: Annotated[str | None, typer.Option(
        help="Check a running OIP server (toolkit serve, Triton, KServe) instead, e.g. http://127.0.0.1:8080.")
    ] = None,
    model: Annotated[str | None, typer.Option(
        help="With --endpoint: the served model's name (default: the export folder's name).")] = None,
    json_path: Annotated[Path, typer.Option(
        "--json", help="With --endpoint: where to write the report.")] = BENCH_DIR / "endpoint-parity.json",
    deadline: Annotated[float | None, typer.Option(
        help="With --endpoint: seconds the endpoint gets for all its answers together (default 600).")] = None,
    max_answer_mb: Annotated[float | None, typer.Option(
        help="With --endpoint: the most MB one answer may have, none decompressed (default 16).")] = None,
) -> None:
    """Run every artifact of an export over the whole test set against PyTorch; write parity.json.
    With --endpoint, send the test set through a served model instead and write endpoint-parity.json.

    Exits non-zero, naming the backend and the worst sample, when any backend disagrees.
    """
    export_dir = export_dir or newest_export_dir()
    endpoint_only = {"model": model, "deadline": deadline, "max_answer_mb": max_answer_mb}
    if endpoint is not None:
        from toolkit.export.endpoint_parity import verify_endpoint

        limits = {name: value for name, value in endpoint_only.items() if value is not None and name != "model"}
        with console.status(f"checking {endpoint}...") as status:
            report = verify_endpoint(export_dir, endpoint, model=model, data_dir=data_dir, atol=atol, rtol=rtol,
                                     json_path=json_path, **limits,
                                     progress=lambda name: status.update(f"checking {name} at {endpoint}..."))
        _show_parity(report)
        report.raise_for_failure(f"endpoint parity check failed at {endpoint}")
        console.print(f"endpoint parity report: {json_path}")
        return
    for name, value in endpoint_only.items():
        if value is not None:
            raise ToolkitError("applies to `endpoint` only", option=name)
    from toolkit.export.publish import attach_parity
    from toolkit.export.verify import verify_export

    with console.status("verifying...") as status:
        report = verify_export(export_dir, data_dir=data_dir, atol=atol, rtol=rtol, max_acc_drop=max_acc_drop,
                               progress=lambda name: status.update(f"verifying {name}..."))
    _show_parity(report)
    attach_parity(export_dir, report)
    report.raise_for_failure()
    console.print(f"parity report: {export_dir / 'parity.json'}")


def _show_parity(report: ParityReport) -> None:
    from toolkit.cli.console import parity_table

    console.print(parity_table(report))
    if report.passed:
        console.print("[bold green]parity verified[/]")


ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="Export dir or .onnx file (default: newest under exports/).")
]
ProviderOption = Annotated[Device, typer.Option(help="onnxruntime provider; auto: CUDA when it really loads.")]
ThreadsOption = Annotated[int | None, typer.Option(min=1, help="onnxruntime intra-op threads (default: all cores).")]
IntegrityOption = Annotated[
    bool, typer.Option("--skip-integrity-check",
                       help="Serve a model whose files cannot be proven to match its export's manifest.")
]


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(
        help="Image files (PNG, JPEG, ...; any size, dark-on-light or light-on-dark) or folders of them.")],
    model: ModelOption = None,
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to show.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per image.")] = False,
    provider: ProviderOption = Device.auto,
    threads: ThreadsOption = None,
    skip_integrity_check: IntegrityOption = False,
) -> None:
    """Classify image files through the same preprocessing as the demo.

    Example: toolkit predict my-digit.png scans/ --top-k 3 --json
    """
    from toolkit.runtime.inference import classify_files
    from toolkit.runtime.predictor import Predictor

    predictor = Predictor(model or newest_export_dir(), provider=provider.value, threads=threads,
                          check_integrity=not skip_integrity_check)
    results = classify_files(predictor, images, top_k)
    verified = predictor.integrity.startswith("verified")
    if not json_output or not verified:
        note = "" if verified else f" ({predictor.integrity})"
        err_console.print(f"model {predictor.path} on onnxruntime-{predictor.provider}{note}", highlight=False)
    if json_output:
        typer.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            if "error" in result:
                console.print(f"{result['file']}: [red]{result['error']}", highlight=False)
            elif result["label"] is None:
                console.print(f"{result['file']}: nothing to classify", highlight=False)
            else:
                ranked = ", ".join(f"{r['label']} {r['probability']:.1%}" for r in result["top_k"])
                console.print(f"{result['file']}: [bold]{result['label']}[/]  ({ranked})", highlight=False)
    if all("error" in r for r in results):
        raise typer.Exit(1)


@app.command()
def demo(
    export_dir: ExportDirArgument = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 7860,
    share: Annotated[bool, typer.Option(help="Also open a public gradio.live link.")] = False,
    provider: ProviderOption = Device.auto,
    threads: Annotated[int, typer.Option(
        min=1, help="onnxruntime intra-op threads per request; concurrent requests already run in parallel.")] = 1,
    skip_integrity_check: IntegrityOption = False,
    feedback_dir: Annotated[Path, typer.Option(
        help="Where people's corrections go (one JSON file each; see `toolkit feedback`).")] = Path("feedback"),
    feedback: Annotated[bool, typer.Option("--feedback/--no-feedback", help="Offer right / wrong after each "
                                           "prediction and save the answers.")] = True,
) -> None:
    """Serve the Gradio sketchpad demo: draw a digit in the browser, see the prediction, and say
    whether it was right."""
    import logging

    from toolkit.demo.app import launch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    export_dir = export_dir or newest_export_dir()
    console.print(f"starting the demo for {export_dir} on http://{host}:{port} ...")
    launch(export_dir, host=host, port=port, share=share, provider=provider.value, threads=threads,
           check_integrity=not skip_integrity_check, feedback_dir=feedback_dir if feedback else None)


@app.command()
def serve(
    export_dir: ExportDirArgument = None,
    name: Annotated[str | None, typer.Option(
        help="Model name in the protocol's URLs (default: the export folder's name).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port (REST).")] = 8080,
    grpc_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Also serve the protocol over gRPC on this port (default: off).")] = None,
    provider: ProviderOption = Device.auto,
    threads: ThreadsOption = None,
    max_batch_size: Annotated[int, typer.Option(
        help="Most images merged into one model run; 1 turns dynamic batching off.")] = DEFAULT_MAX_BATCH_SIZE,
    max_batch_delay_ms: Annotated[float, typer.Option(
        help="Longest a request waits for others to share its run.")] = DEFAULT_MAX_DELAY_MS,
    skip_integrity_check: IntegrityOption = False,
    log_requests: Annotated[bool, typer.Option(help="Log one line per request with its latency.")] = False,
    workers: Annotated[int, typer.Option(
        help="Server processes sharing the port, each with its own model and batcher.")] = 1,
) -> None:
    """Serve an export on the Open Inference Protocol v2 (KServe's model server): NAME takes
    tensors, NAME-image takes encoded images; metrics at /metrics.

    Example: toolkit serve exports/lenet --port 8080
    """
    from toolkit.serving.server import ServeOptions
    from toolkit.serving.server import serve as serve_export

    options = ServeOptions(name=name, host=host, port=port, grpc_port=grpc_port, provider=provider.value,
                           threads=threads, max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms,
                           check_integrity=not skip_integrity_check, workers=workers, log_requests=log_requests)

    def ready(url: str, models: list[str]) -> None:
        grpc = f", gRPC on {host}:{grpc_port}" if grpc_port else ""
        processes = f", {workers} worker processes" if workers > 1 else ""
        console.print(f"serving {' and '.join(models)} on {url}/v2/models/{models[0]}{grpc} "
                      f"(Open Inference Protocol v2; metrics at {url}/metrics{processes})", highlight=False)

    serve_export(export_dir or newest_export_dir(), options, on_ready=ready)


@app.command()
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
    from rich.table import Table

    from toolkit.insight.evaluate import evaluate as run_evaluation

    model = model or newest_run_checkpoint(runs_dir)
    with console.status("evaluating..."):
        report_dir, report = run_evaluation(model, out, dataset=dataset, data_dir=data_dir, provider=provider.value,
                                            check_integrity=not skip_integrity_check, images=images)
    for problem in report["problems"]:
        err_console.print(problem, highlight=False)
    table = Table(title=f"{report['model']} ({report['backend']}) on {report['dataset']}: "
                        f"accuracy {report['accuracy']:.2%}")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, m in report["per_class"].items():
        table.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    console.print(table)
    if report["integrity"].startswith(("unverified", "not checked")):
        err_console.print(f"note: the model is {report['integrity']}", highlight=False)
    console.print(f"report directory: {report_dir}")


@app.command("inspect")
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
    from rich.table import Table

    from toolkit.insight.inspect_model import inspect_model

    out_dir, report = inspect_model(target or newest_run_checkpoint(runs_dir), out, data_dir=data_dir)
    table = Table(title=f"{report['model']} ({'trained' if report['trained'] else 'untrained'})")
    for column in ("layer", "type", "output shape", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for row in report["layers"]:
        table.add_row(row["name"], row["type"], "x".join(map(str, row["output_shape"])), f"{row['parameters']:,}")
    table.add_row("total", "", "", f"{report['total_parameters']:,}", style="bold")
    console.print(table)
    console.print(f"FLOPs per image: {report['flops_per_image']:,}")
    for note in report["notes"]:
        console.print(f"note: {note}")
    console.print(f"inspect directory: {out_dir}")


@app.command("compare")
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
    from rich.table import Table

    from toolkit.insight.compare import compare

    with epoch_progress() as progress:
        out_dir, rows = compare(archs, epochs=epochs, recipe=recipe.value, dataset=dataset, data_dir=data_dir,
                                limit_train=limit_train, seed=seed, out_dir=out, device=device.value,
                                progress=progress, log=console.print)
    table = Table(title=f"{', '.join(archs)} on {dataset}")
    for column in ("model", "parameters", "epochs", "best test acc", "train s", "latency (batch 1)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(r["arch"], f"{r['parameters']:,}", str(r["epochs"]), f"{r['best_test_acc']:.2%}",
                      f"{r['train_seconds']:.1f}", f"{r['latency_us_batch1']:.0f} µs")
    console.print(table)
    console.print(f"compare directory: {out_dir}")


JsonOption = Annotated[Path, typer.Option("--json", help="Where to write the results as JSON.")]
bench_app = typer.Typer(help="Benchmarks: inference backends, the training loop, request handling, the demo server.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _write_bench_json(path: Path, data: dict) -> None:
    from toolkit.core.fileio import write_json

    write_json(path, data)
    console.print(f"results: {path}")


def _check_bench_json(path: Path) -> None:
    """An unwritable --json path fails before the benchmark, not after minutes of it."""
    from toolkit.core.fileio import check_writable

    check_writable(path)


@bench_app.command("infer")
def bench_infer_command(
    export_dir: ExportDirArgument = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,32,256,1024",
    threads: Annotated[int | None, typer.Option(
        min=1, help="Threads for torch and onnxruntime (default: cores).")] = None,
    seconds: Annotated[float, typer.Option(help="Minimum measuring time per backend and batch size.")] = 0.5,
    rounds: Annotated[int, typer.Option(help="Backends take turns in this many slices, so drift hits all alike.")] = 5,
    json_path: JsonOption = BENCH_DIR / "bench-infer.json",
) -> None:
    """Latency p50/p99 and images/s per backend and batch size, with speed-up over PyTorch eager."""
    from rich.table import Table

    from toolkit.bench.local import bench_infer

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ToolkitError(f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}") from None
    export_dir = export_dir or newest_export_dir()
    _check_bench_json(json_path)
    with console.status("benchmarking...") as status:
        result = bench_infer(export_dir, sizes, threads=threads, min_seconds=seconds, rounds=rounds,
                             progress=lambda what: status.update(f"benchmarking {what}..."))
    table = Table(title=f"inference on {result['machine']['cpu']}, {result['threads']} threads")
    for column in ("backend", "batch", "p50 µs", "p99 µs", "images/s", "vs eager"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in result["rows"]:
        table.add_row(r["backend"], str(r["batch_size"]), f"{r['p50_us']:,.1f}", f"{r['p99_us']:,.1f}",
                      f"{r['images_per_s']:,.0f}", f"{r['speedup_vs_eager']:.2f}x")
    console.print(table)
    _write_bench_json(json_path, result)


@bench_app.command("train")
def bench_train_command(
    arch: Annotated[str, typer.Argument(help="Zoo model to train.")] = "lenet",
    data_dir: DataDirOption = None,
    notebook_batches: Annotated[int, typer.Option(help="Batches of the notebook loop to time.")] = 300,
    limit_train: Annotated[int | None, typer.Option(help="Toolkit loop: first N images only.")] = None,
    target: Annotated[float, typer.Option(help="Test accuracy to time (fraction).")] = 0.99,
    json_path: JsonOption = BENCH_DIR / "bench-train.json",
) -> None:
    """The toolkit's training loop against the classic DataLoader notebook loop, same machine, same run."""
    from toolkit.bench.local import bench_train

    _check_bench_json(json_path)
    result = bench_train(arch, data_dir=data_dir, notebook_batches=notebook_batches, limit_train=limit_train,
                         target=target, log=console.print)
    tk, nb = result["toolkit"], result["notebook"]
    console.print(f"notebook loop: {nb['images_per_s']:,.0f} images/s ({nb['seconds_per_epoch']:.1f} s/epoch)")
    to_target = f"{tk['seconds_to_target']:.1f} s" if tk["seconds_to_target"] is not None else "not reached"
    console.print(f"toolkit loop:  {tk['images_per_s']:,.0f} images/s ({tk['seconds_per_epoch']:.1f} s/epoch), "
                  f"best {tk['best_test_acc']:.2%}, {target:.0%} reached in {to_target}")
    console.print(f"speed-up: {result['speedup_images_per_s']:.2f}x images/s")
    _write_bench_json(json_path, result)


@bench_app.command("finetune")
def bench_finetune_command(
    base: Annotated[Path | None, typer.Argument(
        help="Checkpoint, run or export dir to fine-tune (default: the newest run's best.pt).")] = None,
    data_dir: DataDirOption = None,
    feedback: Annotated[int, typer.Option(help="Styled digits to fine-tune on.")] = 200,
    heldout: Annotated[int, typer.Option(help="Other styled digits to score on.")] = 200,
    extra_weight: Annotated[int, typer.Option(help="Times each feedback digit is seen per epoch.")] = 20,
    runs_dir: RunsDirOption = Path("runs"),
    json_path: JsonOption = BENCH_DIR / "bench-finetune.json",
) -> None:
    """Fine-tune on digits in styles MNIST lacks (hollow, dot-matrix): held-out accuracy and test
    accuracy before and after, and the time it took."""
    from toolkit.bench.local import bench_finetune

    _check_bench_json(json_path)
    result = bench_finetune(base or newest_run_checkpoint(runs_dir), data_dir=data_dir, feedback=feedback,
                            heldout=heldout, extra_weight=extra_weight, log=console.print)
    before, after = result["before"], result["after"]
    console.print(f"held-out styled digits: {before['heldout_acc']:.2%} -> {after['heldout_acc']:.2%} "
                  f"({result['heldout_gain_points']:+.1f} points); test set: {before['test_acc']:.2%} -> "
                  f"{after['test_acc']:.2%} ({-result['test_drop_points']:+.2f} points); fine-tuning took "
                  f"{result['seconds']:.1f} s ({result['epochs']} epochs)", highlight=False)
    _write_bench_json(json_path, result)


@bench_app.command("classify")
def bench_classify_command(
    export_dir: ExportDirArgument = None,
    repeats: Annotated[int, typer.Option(help="Passes over the inputs of each kind.")] = 20,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads per request, as in `toolkit demo`.")] = 1,
    json_path: JsonOption = BENCH_DIR / "bench-classify.json",
) -> None:
    """Server-side time of one demo request (preprocessing + inference) for uploads, sketchpad
    canvases and large photos, in this process: what the demo reports as latency.
    """
    from rich.table import Table

    from toolkit.bench.local import bench_classify

    _check_bench_json(json_path)
    with console.status("benchmarking..."):
        result = bench_classify(export_dir or newest_export_dir(), sorted(EXAMPLES_DIR.glob("*.png")),
                                repeats=repeats, threads=threads)
    table = Table(title=f"server-side time per request on {result['machine']['cpu']} ({result['provider']})")
    for column in ("input", "requests", "p50 ms", "p99 ms", "labelled right"):
        table.add_column(column, justify="left" if column == "input" else "right")
    for r in result["rows"]:
        table.add_row(r["input"], str(r["requests"]), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['correct']}/{r['inputs']}")
    console.print(table)
    _write_bench_json(json_path, result)


class Server(str, Enum):
    demo = "demo"
    serve = "serve"


def _positive_counts(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ToolkitError(f"must be integers separated by commas, got {text!r}", option=option) from None
    if min(values) <= 0:
        raise ToolkitError(f"must be positive, got {text!r}", option=option)
    return values


@bench_app.command("serve")
def bench_serve_command(
    export_dir: ExportDirArgument = None,
    server: Annotated[Server, typer.Option(
        help="demo: the Gradio demo's REST API; serve: `toolkit serve` on the Open Inference Protocol.")
    ] = Server.demo,
    clients: Annotated[str | None, typer.Option(
        help="Concurrent clients; for serve a comma-separated list (default: demo 16, serve 1,16,64).")] = None,
    requests: Annotated[int | None, typer.Option(
        min=1, help="Requests in all (serve: per run; default: demo 400, serve 2000).")] = None,
    malformed_every: Annotated[int, typer.Option(
        min=0, help="Send a malformed request every N requests (0: never).")] = 0,
    sample_every: Annotated[int, typer.Option(
        min=0, help="Demo soak: read the server's RSS every N requests and report its growth per 1,000 (0: off).")
    ] = 0,
    kinds: Annotated[str, typer.Option(
        help="serve: request kinds, from tensor-json, tensor-binary, image.")] = "tensor-json,tensor-binary,image",
    batching: Annotated[str, typer.Option(help="serve: dynamic batching on, off, or both (on,off).")] = "on,off",
    workers: Annotated[str, typer.Option(
        help="serve: worker processes of the servers measured, comma-separated (1,2: each batching setting "
        "with 1 and with 2).")] = "1",
    baseline: Annotated[bool, typer.Option(
        help="serve: also measure a bare endpoint (parse, onnxruntime, answer) in the same run.")] = True,
    rounds: Annotated[int, typer.Option(min=1, help="serve: rounds the servers take turns over.")] = 3,
    json_path: JsonOption = BENCH_DIR / "bench-serve.json",
) -> None:
    """Start a server and drive concurrent clients at it: the Gradio demo, or `toolkit serve`."""
    _check_bench_json(json_path)
    export_dir = export_dir or newest_export_dir()
    if server == Server.serve:
        _bench_oip(export_dir, _positive_counts(clients or "1,16,64", "clients"), requests or 2000, malformed_every,
                   tuple(kinds.split(",")), batching, _positive_counts(workers, "workers"), baseline, rounds, json_path)
        return
    from toolkit.bench.local import bench_serve

    counts = _positive_counts(clients or "16", "clients")
    if len(counts) != 1:
        raise ToolkitError("takes one number with --server demo", option="clients")
    result = bench_serve(export_dir, sorted(EXAMPLES_DIR.glob("*.png")), clients=counts[0],
                         requests=requests or 400, malformed_every=malformed_every, sample_every=sample_every,
                         log=console.print)

    def figure(key: str, spec: str) -> str:  # None when no request succeeded, or no RSS was read
        return "n/a" if result.get(key) is None else format(result[key], spec)

    soak = "" if not sample_every else (
        f"; RSS slope {figure('rss_slope_mb_per_1000', '+.1f')} MB per 1,000 requests "
        f"({figure('rss_slope_second_half_mb_per_1000', '+.1f')} over the second half)")
    console.print(
        f"{result['requests']} requests ({result['malformed_requests']} malformed), {result['clients']} clients: "
        f"{result['errors']} errors, {result['throughput_rps']:.1f} req/s, latency p50 {figure('p50_ms', '.1f')} ms, "
        f"p95 {figure('p95_ms', '.1f')} ms, p99 {figure('p99_ms', '.1f')} ms; "
        f"server-side p50 {figure('server_side_p50_ms', '.2f')} ms; server memory "
        f"{figure('server_rss_mb_before', '.0f')} -> {figure('server_rss_mb_after', '.0f')} MB{soak}"
    )
    _write_bench_json(json_path, result)


def _bench_oip(export_dir: Path, clients: tuple[int, ...], requests: int, malformed_every: int,
               kinds: tuple[str, ...], batching: str, workers: tuple[int, ...], baseline: bool, rounds: int,
               json_path: Path) -> None:
    from rich.table import Table

    from toolkit.bench.serving import bench_oip

    settings = {"on": True, "off": False}
    chosen = tuple(settings.get(part) for part in batching.split(","))
    if None in chosen:
        raise ToolkitError(f"must be on, off or on,off, got {batching!r}", option="batching")
    result = bench_oip(export_dir, sorted(EXAMPLES_DIR.glob("*.png")), clients=clients,
                       requests=requests, kinds=kinds, batching=chosen, workers=workers,
                       malformed_every=malformed_every,
                       baseline=baseline, rounds=rounds, log=console.print)
    table = Table(title=f"{Path(export_dir).name}: {requests} requests per run, medians of {rounds} rounds")
    for column in ("server", "requests", "clients", "req/s", "p50 ms", "p99 ms", "errors"):
        table.add_column(column, justify="left" if column in ("server", "requests") else "right")
    for run in sorted(result["runs"], key=lambda r: (r["kind"], r["clients"], r["server"])):
        figures = (f"{run[k]:.1f}" if run[k] is not None else "n/a" for k in ("p50_ms", "p99_ms"))
        table.add_row(run["server"], run["kind"], str(run["clients"]), f"{run['throughput_rps']:.0f}", *figures,
                      str(run["errors"]))
    console.print(table)
    for server in result["servers"]:
        before, after = (f"{server[k]:.0f}" if server[k] is not None else "n/a" for k in ("rss_mb_before",
                                                                                       "rss_mb_after"))
        console.print(f"{server['server']}: memory {before} -> {after} MB", highlight=False)
    _write_bench_json(json_path, result)


class _ReviewByDefault(TyperGroup):
    """`toolkit feedback [DIR]` reviews DIR: an argument that names no command is review's."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["review", *args]
        return super().parse_args(ctx, args)


feedback_app = typer.Typer(cls=_ReviewByDefault, help="Review the corrections collected by the demo "
                           "(`toolkit feedback [DIR]`), drop some, export them to train on.")
app.add_typer(feedback_app, name="feedback")
FeedbackDirArgument = Annotated[Path, typer.Argument(help="The demo's --feedback-dir.")]


@feedback_app.callback(invoke_without_command=True)
def feedback_default(ctx: typer.Context) -> None:
    """With no command: review ./feedback; with a folder: review it."""
    if ctx.invoked_subcommand is None:
        feedback_review(Path("feedback"))


@feedback_app.command("review")
def feedback_review(
    folder: FeedbackDirArgument = Path("feedback"),
    out: Annotated[Path | None, typer.Option(help="Report dir (default: reports/feedback).")] = None,
) -> None:
    """Examples per class, how often the model was wrong and which confusions; feedback.png
    (the corrected drawings) and feedback.json."""
    from rich.table import Table

    from toolkit.feedback.store import FeedbackStore, write_review

    examples, problems = FeedbackStore(folder).examples()
    for problem in problems:
        err_console.print(problem, highlight=False)
    out = out or BENCH_DIR / "feedback"
    report = write_review(examples, problems, out)
    table = Table(title=f"{folder}: {report['examples']} examples, {report['corrected']} corrected")
    for column in ("class", "examples", "model was wrong"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, count in report["per_class"].items():
        table.add_row(name, str(count), str(report["wrong_per_class"].get(name, 0)))
    console.print(table)
    for confusion in report["confusions"][:10]:
        console.print(f"{confusion['label']} taken for {confusion['predicted']}: {confusion['count']}",
                      highlight=False)
    console.print(f"report directory: {out}")


@feedback_app.command("drop")
def feedback_drop(
    example_id: Annotated[str, typer.Argument(help="The example's id (its file name without .json).")],
    folder: Annotated[Path, typer.Option("--dir", help="The feedback folder.")] = Path("feedback"),
) -> None:
    """Remove an example that is wrong or unwanted."""
    from toolkit.feedback.store import FeedbackStore

    FeedbackStore(folder).drop(example_id)
    console.print(f"dropped {example_id} from {folder}")


@feedback_app.command("export")
def feedback_export(
    folder: FeedbackDirArgument,
    out: Annotated[Path, typer.Argument(help="New folder: OUT/train/<class>/*.png and OUT/heldout/<class>/*.png.")],
    heldout_percent: Annotated[int, typer.Option(help="Share of examples held out, chosen by content.")] = 50,
) -> None:
    """The drawings as drawn, as labelled images to train (`train --extra-data OUT/train`) and
    evaluate (`evaluate --images OUT/heldout`) on; the split is by content (the same drawing is
    always on the same side), stable as the folder grows, and a drawing saved again with the same
    label is exported once."""
    from toolkit.feedback.store import FeedbackStore, export_image_folder

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ToolkitError(f"{out} exists and is not an empty folder; choose a new folder")
    examples, problems = FeedbackStore(folder).examples()
    for problem in problems:
        err_console.print(problem, highlight=False)
    if not examples:
        raise ToolkitError(f"{folder} holds no examples to export")
    counts = export_image_folder(examples, out, heldout_percent)
    console.print(f"{counts['train']} examples to {out / 'train'}, {counts['heldout']} to {out / 'heldout'}"
                  + (f"; {counts['duplicates']} saved again left out" if counts["duplicates"] else ""))


@app.command()
def promote(
    candidate: Annotated[Path | None, typer.Argument(help="The fine-tuned export to promote.")] = None,
    serving: Annotated[Path, typer.Option(help="The export being served (demo or serve).")] = Path("exports/lenet"),
    heldout: Annotated[Path | None, typer.Option(
        help="Held-out labelled images (e.g. OUT/heldout of `toolkit feedback export`).")] = None,
    max_acc_drop: Annotated[float, typer.Option(help="Test-accuracy points the candidate may lose.")] = 0.2,
    data_dir: DataDirOption = None,
    out: Annotated[Path, typer.Option(help="Where promotion.json and changed.png go.")] = BENCH_DIR / "promotion",
    rollback: Annotated[bool, typer.Option("--rollback", help="Bring back the export the last promotion "
                                           "replaced (and keep the current one in its place).")] = False,
) -> None:
    """Replace the served export with CANDIDATE only if its parity holds, it loses at most
    --max-acc-drop points on the test set and it is right more often on --heldout; otherwise
    nothing changes. The replaced export is kept as SERVING.previous.

    Example: toolkit promote exports/lenet-tuned --serving exports/lenet --heldout corrections/heldout
    """
    from toolkit.feedback.promote import promote as promote_export
    from toolkit.feedback.promote import rollback as roll_back

    if rollback:
        if candidate is not None or heldout is not None:
            raise ToolkitError("takes only `serving`", option="rollback")
        kept = roll_back(serving)
        console.print(f"rolled back: {serving} is the previous export again; the replaced one is kept as {kept}")
        return
    if candidate is None or heldout is None:
        raise ToolkitError("needs a CANDIDATE export and `heldout` images (or pass `rollback`)")
    with console.status("scoring the candidate and the served model..."):
        result = promote_export(candidate, serving, heldout, data_dir=data_dir, max_acc_drop=max_acc_drop,
                                report_dir=out)
    console.print(f"report: {out / 'promotion.json'}, {out / 'changed.png'}")
    if not result.promoted:
        raise ToolkitError(f"not promoted, {serving} unchanged: {result.reason}")
    console.print(f"{result.reason}; the replaced export is kept as {result.kept_as}")


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
    """Entry point: every user error becomes one line on stderr and a non-zero exit, never a traceback."""
    try:
        _run_app()
    except BrokenPipeError:  # `toolkit ... | head`: the reader has gone, so has anyone to tell
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush must not fail too
        sys.exit(1)


def _run_app() -> None:
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # bad usage: unknown option, missing argument, bad choice
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `toolkit` alone: the help is the answer
            typer.echo(message)
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        _fail(f"{message} (see `{ctx.command_path if ctx else 'toolkit'} --help`)", code=2)
    except ToolkitError as exc:
        _fail(exc.for_command_line(), code=exc.exit_code)
    except KeyboardInterrupt:  # before typer runs the command
        code = 130
    except Exception as exc:
        if not _caused_by_ctrl_c(exc):
            raise
        code = 130
    if code == 130:  # typer turns Ctrl-C inside a command into exit code 130, silently
        _fail("interrupted", code=130)
    sys.exit(code if isinstance(code, int) else 0)


def _caused_by_ctrl_c(exc: BaseException | None) -> bool:
    """Ctrl-C inside a library can surface as its own error: torch.onnx.export, interrupted while it
    imports torch._dynamo, raises TorchExportError from the AttributeError the half import left."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)
