"""`toolkit export` and `toolkit verify`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from toolkit.cli import tables
from toolkit.cli.console import console
from toolkit.cli.options import (
    BENCH_DIR,
    AccDropOption,
    AtolOption,
    DataDirOption,
    ExportDirArgument,
    ExportFormat,
    RtolOption,
    RunsDirOption,
)
from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.core.formats import ALL
from toolkit.core.locate import newest_export_dir, newest_run_checkpoint

if TYPE_CHECKING:
    from toolkit.export.verify import ParityReport


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
    from toolkit.export.verify import verify_export

    with console.status("verifying...") as status:
        report = verify_export(export_dir, data_dir=data_dir, atol=atol, rtol=rtol, max_acc_drop=max_acc_drop,
                               progress=lambda name: status.update(f"verifying {name}..."))
    _show_parity(report)
    report.raise_for_failure()
    console.print(f"parity report: {Export(export_dir).parity_path}")


def _show_parity(report: ParityReport) -> None:
    console.print(tables.parity_table(report))
    if report.passed:
        console.print("[bold green]parity verified[/]")


