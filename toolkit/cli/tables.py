"""Every table the commands print, built from the reports the library returns (which go to
JSON as they are): what a command shows is decided here, what it computes in the library."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from toolkit.export.verify import ParityReport


def parity_table(report: ParityReport) -> Table:
    """The verify report as a table: one row per backend, verdict last."""
    table = Table(title=f"parity against PyTorch on {report.samples:,} inputs "
                        f"({report.dataset} test set + {len(report.edge_cases)} edge batches)")
    for column in ("backend", "artifact", "accuracy", "max abs diff", "max rel diff", "top-1 agree",
                   "shapes", "verdict"):
        table.add_column(column, justify="left" if column in ("backend", "artifact") else "right")
    table.add_row("pytorch (reference)", "model.pt", f"{report.reference_accuracy:.2%}", "-", "-", "-",
                  "ok", "-")
    for name, r in report.backends.items():
        table.add_row(
            name, r.artifact, f"{r.accuracy:.2%}", f"{r.max_abs_diff:.2e}", f"{r.max_rel_diff:.2e}",
            f"{r.top1_agreement:.2%}", "ok" if r.shapes_ok else "[red]bad",
            "[green]pass" if r.passed else "[bold red]FAIL",
        )
    table.caption = (f"fp32: |diff| <= {report.atol:g} + {report.rtol:g} x |ref| and 100% top-1 agreement; "
                     f"int8/fp16: accuracy drop <= {report.max_acc_drop} points")
    return table


def evaluate_table(report: dict[str, Any]) -> Table:
    """evaluate: the table the command prints."""
    table = Table(title=f"{report['model']} ({report['backend']}) on {report['dataset']}: "
                        f"accuracy {report['accuracy']:.2%}")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, m in report["per_class"].items():
        table.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    return table


def inspect_table(report: dict[str, Any]) -> Table:
    """inspect: the table the command prints."""
    table = Table(title=f"{report['model']} ({'trained' if report['trained'] else 'untrained'})")
    for column in ("layer", "type", "output shape", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for row in report["layers"]:
        table.add_row(row["name"], row["type"], "x".join(map(str, row["output_shape"])), f"{row['parameters']:,}")
    table.add_row("total", "", "", f"{report['total_parameters']:,}", style="bold")
    return table


def compare_table(rows: list[dict[str, Any]], archs: list[str], dataset: str) -> Table:
    """compare: the table the command prints."""
    table = Table(title=f"{', '.join(archs)} on {dataset}")
    for column in ("model", "parameters", "epochs", "best test acc", "train s", "latency (batch 1)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(r["arch"], f"{r['parameters']:,}", str(r["epochs"]), f"{r['best_test_acc']:.2%}",
                      f"{r['train_seconds']:.1f}", f"{r['latency_us_batch1']:.0f} µs")
    return table


def models_table() -> Table:
    """models: the table the command prints."""
    from toolkit.models import count_parameters, create_model, get_entry, list_models

    table = Table(title="model zoo")
    table.add_column("name", style="bold")
    table.add_column("parameters", justify="right")
    table.add_column("description")
    for name in list_models():
        table.add_row(name, f"{count_parameters(create_model(name)):,}", get_entry(name).description)
    return table


def feedback_table(report: dict[str, Any], folder: Path) -> Table:
    """feedback: the table the command prints."""
    table = Table(title=f"{folder}: {report['examples']} examples, {report['corrected']} corrected")
    for column in ("class", "examples", "model was wrong"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, count in report["per_class"].items():
        table.add_row(name, str(count), str(report["wrong_per_class"].get(name, 0)))
    return table


def bench_infer_table(result: dict[str, Any]) -> Table:
    """bench infer: the table the command prints."""
    table = Table(title=f"inference on {result['machine']['cpu']}, {result['threads']} threads")
    for column in ("backend", "batch", "p50 µs", "p99 µs", "images/s", "vs eager"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in result["rows"]:
        table.add_row(r["backend"], str(r["batch_size"]), f"{r['p50_us']:,.1f}", f"{r['p99_us']:,.1f}",
                      f"{r['images_per_s']:,.0f}", f"{r['speedup_vs_eager']:.2f}x")
    return table


def bench_classify_table(result: dict[str, Any]) -> Table:
    """bench classify: the table the command prints."""
    table = Table(title=f"server-side time per request on {result['machine']['cpu']} ({result['provider']})")
    for column in ("input", "requests", "p50 ms", "p99 ms", "labelled right"):
        table.add_column(column, justify="left" if column == "input" else "right")
    for r in result["rows"]:
        table.add_row(r["input"], str(r["requests"]), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['correct']}/{r['inputs']}")
    return table


def bench_serve_table(result: dict[str, Any], export_dir: Path, requests: int, rounds: int) -> Table:
    """bench serve: the table the command prints."""
    table = Table(title=f"{Path(export_dir).name}: {requests} requests per run, medians of {rounds} rounds")
    for column in ("server", "requests", "clients", "req/s", "p50 ms", "p99 ms", "errors"):
        table.add_column(column, justify="left" if column in ("server", "requests") else "right")
    for run in sorted(result["runs"], key=lambda r: (r["kind"], r["clients"], r["server"])):
        figures = (f"{run[k]:.1f}" if run[k] is not None else "n/a" for k in ("p50_ms", "p99_ms"))
        table.add_row(run["server"], run["kind"], str(run["clients"]), f"{run['throughput_rps']:.0f}", *figures,
                      str(run["errors"]))
    return table
