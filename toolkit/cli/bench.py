"""`toolkit bench ...`: the benchmarks."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from toolkit.cli import tables
from toolkit.cli.console import console
from toolkit.cli.options import (
    BENCH_DIR,
    DataDirOption,
    ExportDirArgument,
    JsonOption,
    RunsDirOption,
)
from toolkit.core.errors import ToolkitError
from toolkit.core.locate import EXAMPLES_DIR, newest_export_dir, newest_run_checkpoint

bench_app = typer.Typer(help="Benchmarks: inference backends, the training loop, request handling, the demo server.",
                        no_args_is_help=True)


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
    from toolkit.bench.infer import bench_infer

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ToolkitError(f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}") from None
    export_dir = export_dir or newest_export_dir()
    _check_bench_json(json_path)
    with console.status("benchmarking...") as status:
        result = bench_infer(export_dir, sizes, threads=threads, min_seconds=seconds, rounds=rounds,
                             progress=lambda what: status.update(f"benchmarking {what}..."))
    console.print(tables.bench_infer_table(result))
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
    from toolkit.bench.training import bench_train

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
    limit_train: Annotated[int | None, typer.Option(help="Fine-tune on the first N images only (smoke runs).")] = None,
    json_path: JsonOption = BENCH_DIR / "bench-finetune.json",
) -> None:
    """Fine-tune on digits in styles MNIST lacks (hollow, dot-matrix): held-out accuracy and test
    accuracy before and after, and the time it took."""
    from toolkit.bench.training import bench_finetune

    _check_bench_json(json_path)
    result = bench_finetune(base or newest_run_checkpoint(runs_dir), data_dir=data_dir, feedback=feedback,
                            heldout=heldout, extra_weight=extra_weight, limit_train=limit_train,
                            log=console.print)
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
    from toolkit.bench.demo import bench_classify

    _check_bench_json(json_path)
    with console.status("benchmarking..."):
        result = bench_classify(export_dir or newest_export_dir(), sorted(EXAMPLES_DIR.glob("*.png")),
                                repeats=repeats, threads=threads)
    console.print(tables.bench_classify_table(result))
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
    from toolkit.bench.demo import bench_serve

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
    from toolkit.bench.serving import bench_oip

    settings = {"on": True, "off": False}
    chosen = tuple(settings.get(part) for part in batching.split(","))
    if None in chosen:
        raise ToolkitError(f"must be on, off or on,off, got {batching!r}", option="batching")
    result = bench_oip(export_dir, sorted(EXAMPLES_DIR.glob("*.png")), clients=clients,
                       requests=requests, kinds=kinds, batching=chosen, workers=workers,
                       malformed_every=malformed_every,
                       baseline=baseline, rounds=rounds, log=console.print)
    console.print(tables.bench_serve_table(result, export_dir, requests, rounds))
    for server in result["servers"]:
        before, after = (f"{server[k]:.0f}" if server[k] is not None else "n/a" for k in ("rss_mb_before",
                                                                                       "rss_mb_after"))
        console.print(f"{server['server']}: memory {before} -> {after} MB", highlight=False)
    _write_bench_json(json_path, result)


