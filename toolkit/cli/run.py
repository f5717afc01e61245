"""`toolkit predict`, `toolkit demo` and `toolkit serve`: running an export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from toolkit.cli.console import console, err_console
from toolkit.cli.options import (
    Device,
    ExportDirArgument,
    IntegrityOption,
    ModelOption,
    ProviderOption,
    ThreadsOption,
)
from toolkit.core.contract import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS
from toolkit.core.locate import newest_export_dir


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


