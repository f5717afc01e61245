"""Benchmarks: inference per backend, the training loop against the notebook loop, the demo server.

Figures are medians over many runs, and every ratio is taken within the same run so machine
noise cancels. None of this is a test: tests only check the commands run and write valid JSON.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.core.formats import FORMATS
from toolkit.core.locate import example_label
from toolkit.models.checkpoint import build_deployable, load_checkpoint
from toolkit.serving.launch import free_port, rss_mb, toolkit_server

Runner = Callable[[], Any]
Loader = Callable[[], Callable[[np.ndarray], Runner]]  # builds a backend: batch -> one-batch runner
SETTLE_SECONDS = 0.03
# Batches this large already show every backend's throughput; each image costs its activations
# several times over in every backend held at once, so larger ones only risk running out of memory.
MAX_BATCH = 8192


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": str(torch.__version__), "cuda": gpu}


def time_runner(run: Runner, *, min_seconds: float = 0.5, min_repeats: int = 20, warmup: int = 10,
                settle_seconds: float = 0.0, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall times of `run` in seconds, after `warmup` runs (and at least `settle_seconds` of them),
    for at least `min_seconds` and `min_repeats`."""
    started = time.perf_counter()
    warmed = 0
    while warmed < warmup or time.perf_counter() - started < settle_seconds:
        run()
        warmed += 1
    if sync:
        sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        run()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 100_000:
            break
    return times


def percentile_us(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times), q) * 1e6)


def _inference_backends(export_dir: Path, threads: int) -> dict[str, Loader]:
    """name -> loader; a loader builds the backend and returns factory(batch) -> one-batch runner.

    Torch modules are loaded once; onnxruntime sessions are built anew on each call, because an
    idle session's worker threads keep waking up and steal cores from the backend being timed.
    """
    from toolkit.runtime.predictor import Predictor, create_session, cuda_provider_usable

    torch.set_num_threads(threads)

    def torch_backend(load: Callable[[], Any], device: str = "cpu") -> Loader:
        load = functools.cache(load)

        def loader() -> Callable[[np.ndarray], Runner]:
            module = load()
            def make(batch: np.ndarray) -> Runner:
                x = torch.from_numpy(batch).to(device)
                def run() -> Any:
                    with torch.inference_mode():
                        return module(x)
                return run
            return make
        return loader

    def onnx_backend(path: Path, provider: str, io_binding: bool = False) -> Loader:
        def loader() -> Callable[[np.ndarray], Runner]:
            session = create_session(path, provider, threads)
            def make(batch: np.ndarray) -> Runner:
                if not io_binding:
                    feeds = {"image": batch}
                    return lambda: session.run(None, feeds)
                # IO binding: input and outputs bound once, so a run() copies nothing in Python.
                binding = session.io_binding()
                binding.bind_cpu_input("image", batch)
                for output in ("logits", "probabilities"):
                    binding.bind_output(output)
                return lambda: session.run_with_iobinding(binding)
            return make
        return loader

    def predictor_backend(path: Path) -> Loader:
        """What `toolkit evaluate` and library users call: input checks, chunked CPU runs."""
        def loader() -> Callable[[np.ndarray], Runner]:
            predictor = Predictor(path, provider="cpu", threads=threads)
            return lambda batch: lambda: predictor.run(batch)
        return loader

    def reference() -> torch.nn.Module:
        return build_deployable(load_checkpoint(Export(export_dir).reference))

    from toolkit.runtime.runners import TORCH_LOADERS

    backends = {"pytorch-eager": torch_backend(reference)}
    cuda = cuda_provider_usable()
    for fmt in FORMATS.values():
        path = export_dir / fmt.artifact
        if fmt.runtime is None or not path.is_file():
            continue
        if fmt.runtime == "torch":
            backends[fmt.backend_name()] = torch_backend(lambda f=fmt, p=path: TORCH_LOADERS[f.name](p))
            continue
        backends[fmt.backend_name("cpu")] = onnx_backend(path, "cpu")
        if fmt.name == "onnx":  # the served model: also with IO binding, and through the Predictor
            backends["onnxruntime-cpu-iobinding"] = onnx_backend(path, "cpu", io_binding=True)
            backends["toolkit-predictor"] = predictor_backend(path)
        if cuda:
            backends[fmt.backend_name("cuda")] = onnx_backend(path, "cuda")
    if torch.cuda.is_available():
        backends["pytorch-cuda"] = torch_backend(lambda: reference().cuda(), "cuda")
    return backends


def bench_infer(export_dir: str | Path, batch_sizes: list[int], *, threads: int | None = None,
                min_seconds: float = 0.5, rounds: int = 5,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Latency p50/p99 and throughput for every backend and batch size, with speed-up over eager.

    Backends take turns in `rounds` short slices, in a rotating order, so a machine that speeds
    up or slows down mid-run affects every backend alike; the speed-up over eager is the median
    of the per-round ratios.
    """
    export = Export(export_dir)
    if not export.reference.is_file():
        raise ToolkitError(f"{export} is not an export dir (no model.pt); run `toolkit export` first")
    if not batch_sizes or any(not 1 <= b <= MAX_BATCH for b in batch_sizes):
        raise ToolkitError(f"batch sizes must be positive and at most {MAX_BATCH}, got {batch_sizes}")
    from toolkit.runtime.predictor import check_threads

    check_threads(threads)
    if rounds < 1:
        raise ToolkitError(f"rounds must be at least 1, got {rounds}")
    if not (math.isfinite(min_seconds) and min_seconds > 0):
        raise ToolkitError(f"must be positive and finite, got {min_seconds}", option="seconds")
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    batches = {size: rng.random((size, 1, 28, 28), dtype=np.float32) for size in batch_sizes}
    loaders = _inference_backends(export.path, threads)
    names = list(loaders)
    times: dict[tuple[str, int], list[float]] = {(name, size): [] for name in names for size in batch_sizes}
    round_p50: dict[tuple[str, int], list[float]] = {key: [] for key in times}
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            if progress:
                progress(f"{name}, round {index + 1}/{rounds}")
            make = loaders[name]()
            sync = torch.cuda.synchronize if name == "pytorch-cuda" else None
            for size, batch in batches.items():
                measured = time_runner(make(batch), min_seconds=min_seconds / rounds, min_repeats=max(3, 20 // rounds),
                                       warmup=3, settle_seconds=SETTLE_SECONDS, sync=sync)
                times[name, size] += measured
                round_p50[name, size].append(statistics.median(measured))
            del make
    rows = []
    for size in batch_sizes:
        for name in names:
            p50 = percentile_us(times[name, size], 50)
            ratios = [e / t for e, t in zip(round_p50["pytorch-eager", size], round_p50[name, size], strict=True)]
            rows.append({"backend": name, "batch_size": size, "p50_us": p50,
                         "p99_us": percentile_us(times[name, size], 99), "images_per_s": size / (p50 / 1e6),
                         "speedup_vs_eager": statistics.median(ratios), "runs": len(times[name, size])})
    return {"kind": "infer", "export_dir": str(export), "threads": threads, "rounds": rounds,
            "machine": machine(), "rows": rows}


def request_inputs(images: list[Path]) -> dict[str, list[Any]]:
    """What a demo server receives, built from digit image files: the uploaded files themselves,
    400x400 sketchpad canvases (black strokes on opaque white RGBA, off-centre) and 1000x1000
    photos of the digit on gray paper.
    """
    from PIL import Image

    from toolkit.imaging.decode import load_image

    canvases, photos = [], []
    for index, path in enumerate(images):
        digit = load_image(path).convert("L")
        if np.median(np.asarray(digit)) > 127:  # examples may be dark-on-light already
            digit = Image.eval(digit, lambda v: 255 - v)
        stroke = np.asarray(digit.resize((240, 240), Image.Resampling.BILINEAR))
        canvas = np.full((400, 400, 4), 255, np.uint8)
        top, left = 20 + 13 * index % 120, 30 + 29 * index % 120
        canvas[top : top + 240, left : left + 240, :3] = 255 - stroke[..., None]
        canvases.append(canvas)
        photo = np.full((1000, 1000, 3), 225, np.uint8)
        ink = np.asarray(digit.resize((360, 360), Image.Resampling.BILINEAR))[..., None]
        photo[300:660, 250 + 20 * index % 300 :][:, :360] = (225 - ink * 0.8).astype(np.uint8)
        photos.append(Image.fromarray(photo))
    return {"upload (PNG file)": list(images), "sketchpad 400x400 RGBA": canvases, "photo 1000x1000 RGB": photos}


def bench_classify(export_dir: str | Path, images: list[Path], *, repeats: int = 20,
                   threads: int = 1) -> dict[str, Any]:
    """Server-side time of one demo request (decode, preprocessing, inference) per kind of input."""
    from toolkit.runtime.inference import classify
    from toolkit.runtime.predictor import Predictor

    if not images:
        raise ToolkitError("no example images to send")
    if repeats <= 0:
        raise ToolkitError("must be positive", option="repeats")
    predictor = Predictor(Path(export_dir), provider="cpu", threads=threads)
    expected = [example_label(path) for path in images]
    rows = []
    for kind, inputs in request_inputs(images).items():
        labels = [classify(predictor, item).label for item in inputs]  # the warm-up pass, answers checked
        times = []
        for _ in range(repeats):
            for item in inputs:
                started = time.perf_counter()
                classify(predictor, item)
                times.append(time.perf_counter() - started)
        correct = sum(a == b for a, b in zip(labels, expected, strict=True))
        rows.append({"input": kind, "requests": len(times), "p50_ms": percentile_us(times, 50) / 1000,
                     "p99_ms": percentile_us(times, 99) / 1000, "correct": correct, "inputs": len(inputs)})
    return {"kind": "classify", "export_dir": str(export_dir), "provider": predictor.provider,
            "threads": threads, "machine": machine(), "rows": rows}


def _notebook_loop_images_per_s(data_dir: Path, arch: str, batches: int) -> tuple[float, float]:
    """The classic course loop for `arch`: torchvision MNIST, ToTensor+Normalize, DataLoader batch 64, SGD."""
    import torchvision
    from torchvision import transforms

    from toolkit.models import create_model

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    try:
        dataset = torchvision.datasets.MNIST(str(data_dir), train=True, transform=transform, download=False)
    except RuntimeError as exc:
        raise ToolkitError(f"the notebook loop needs MNIST in torchvision's layout under {data_dir}: {exc}") from exc
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    torch.manual_seed(0)
    model = create_model(arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen, started = 0, time.perf_counter()
    for index, (x, y) in enumerate(loader):
        if index >= batches:
            break
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    seconds = time.perf_counter() - started
    return seen / seconds, seconds


def bench_train(
    arch: str = "lenet", *, data_dir: str | Path | None = None, notebook_batches: int = 300,
    limit_train: int | None = None, target: float = 0.99, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The toolkit's default-recipe training against the notebook loop, in the same process."""
    from toolkit.data.datasets import resolve_data_dir
    from toolkit.training.train import make_config, train

    if notebook_batches <= 0:
        raise ToolkitError(f"must be positive, got {notebook_batches}", option="notebook_batches")
    if not 0 < target <= 1:
        raise ToolkitError(f"is a test accuracy between 0 and 1 (0.99 for 99%), got {target}", option="target")
    config = make_config(arch, limit_train=limit_train)
    root = resolve_data_dir(data_dir)
    log("notebook loop (DataLoader + transforms, batch 64, SGD)...")
    notebook_ips, notebook_seconds = _notebook_loop_images_per_s(root, arch, notebook_batches)
    log(f"toolkit loop ({arch} default recipe: {config.optimizer}, batch {config.batch_size}, "
        f"{config.epochs} epochs)...")
    with tempfile.TemporaryDirectory() as runs:
        result = train(config, data_dir=root, runs_dir=runs, name="bench", device="cpu", log=log)
    train_images = limit_train or 60_000
    epoch_seconds = [h["seconds"] for h in result.history]
    elapsed, to_target = 0.0, None
    for h in result.history:
        elapsed += h["seconds"]
        if to_target is None and h["test_acc"] >= target:
            to_target = elapsed
    toolkit_ips = train_images * len(epoch_seconds) / sum(epoch_seconds)  # includes per-epoch test pass
    return {
        "kind": "train", "arch": arch, "machine": machine(), "threads": torch.get_num_threads(),
        "toolkit": {"images_per_s": toolkit_ips, "seconds_per_epoch": statistics.median(epoch_seconds),
                    "epochs": config.epochs, "batch_size": config.batch_size, "optimizer": config.optimizer,
                    "best_test_acc": result.best_test_acc, "target_acc": target,
                    "seconds_to_target": to_target, "train_seconds": result.train_seconds},
        "notebook": {"arch": arch, "images_per_s": notebook_ips, "seconds_per_epoch": 60_000 / notebook_ips,
                     "measured_batches": notebook_batches, "measured_seconds": notebook_seconds},
        "speedup_images_per_s": toolkit_ips / notebook_ips,
    }


def bench_finetune(
    base: str | Path, *, data_dir: str | Path | None = None, feedback: int = 200, heldout: int = 200,
    extra_weight: int = 20, seed: int = 0, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """What fine-tuning on corrections buys: `feedback` digits in styles MNIST lacks
    (`toolkit.data.styled`) train `base` further, `heldout` others (another seed) score it before and
    after, with the dataset's test accuracy before and after and the time the run took."""
    from toolkit.data.styled import write_styled_digits
    from toolkit.insight.evaluate import evaluate
    from toolkit.models.checkpoint import checkpoint_file
    from toolkit.training.config import make_config
    from toolkit.training.train import train

    if feedback <= 0 or heldout <= 0:
        raise ToolkitError("`feedback` and `heldout` must be positive")
    base = checkpoint_file(base)
    with tempfile.TemporaryDirectory() as work:
        folders = {"feedback": Path(work, "feedback"), "heldout": Path(work, "heldout")}
        write_styled_digits(folders["feedback"], feedback, seed=2 * seed + 1)
        write_styled_digits(folders["heldout"], heldout, seed=2 * seed + 2)
        trained = load_checkpoint(base)
        config = make_config(trained["arch"], dataset=trained["dataset"], init_from=base,
                             extra_data=folders["feedback"], extra_weight=extra_weight, seed=seed)

        def scores(model: Path) -> dict[str, float]:
            reports = Path(work, "reports", model.parent.name)
            return {"heldout_acc": evaluate(model, reports / "heldout", images=folders["heldout"],
                                            provider="cpu")[1]["accuracy"],
                    "test_acc": evaluate(model, reports / "test", data_dir=data_dir, provider="cpu")[1]["accuracy"]}

        before = scores(base)
        log(f"{base}: {before['heldout_acc']:.2%} on {heldout} held-out styled digits, {before['test_acc']:.2%} test")
        started = time.perf_counter()
        result = train(config, data_dir=data_dir, runs_dir=Path(work, "runs"), name="finetuned", device="cpu",
                       log=log)
        seconds = time.perf_counter() - started
        after = scores(result.run_dir / "best.pt")
    return {
        "kind": "finetune", "machine": machine(), "base": str(base), "arch": config.arch, "feedback": feedback,
        "heldout": heldout, "styles": "hollow and dot-matrix digits (toolkit.data.styled), not made from MNIST",
        "extra_weight": extra_weight, "epochs": config.epochs, "lr": config.lr, "seconds": seconds,
        "train_seconds": result.train_seconds, "before": before, "after": after,
        "heldout_gain_points": 100 * (after["heldout_acc"] - before["heldout_acc"]),
        "test_drop_points": 100 * (before["test_acc"] - after["test_acc"]),
    }


MALFORMED = b"\x89PNG\r\n\x1a\n this is not an image"


def rss_slope(samples: list[dict[str, float]]) -> float | None:
    """Least-squares growth of `rss_mb` in MB per 1,000 `requests`; None under two samples."""
    if len(samples) < 2:
        return None
    slope = np.polyfit([s["requests"] for s in samples], [s["rss_mb"] for s in samples], 1)[0]
    return float(slope * 1000)


def bench_serve(export_dir: str | Path, images: list[Path], *, clients: int = 16, requests: int = 400,
                malformed_every: int = 0, sample_every: int = 0,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """N concurrent HTTP clients against a real demo server: latency, throughput, errors, memory.

    Clients speak Gradio's REST API (upload, call, read the result stream) with one keep-alive
    httpx connection each; gradio_client costs more CPU per call than the server does, which on
    a small machine would measure the client instead of the server. With `malformed_every` N,
    every Nth request sends a corrupt PNG, which must come back as a readable error. With
    `sample_every` N (a soak), the server's RSS is read every N requests and its growth per
    1,000 requests fitted over all samples and over the second half (after warm-up).
    """
    import re
    import threading

    import httpx

    if clients <= 0 or requests <= 0:
        raise ToolkitError("`clients` and `requests` must be positive")
    if sample_every < 0:
        raise ToolkitError(f"must be 0 (off) or positive, got {sample_every}", option="sample_every")
    if not images:
        raise ToolkitError("no example images to send")
    payloads = [(path.read_bytes(), example_label(path)) for path in images]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    api = f"http://127.0.0.1:{port}/gradio_api"
    local = threading.local()
    finished = itertools.count(1)  # next() on a count is atomic: one number per finished request
    samples: list[dict[str, float]] = []

    def call(index: int) -> tuple[float, float | None, str | None]:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120)
        malformed = malformed_every > 0 and index % malformed_every == malformed_every - 1
        data, expected = (MALFORMED, None) if malformed else payloads[index % len(payloads)]
        started = time.perf_counter()
        try:
            upload = local.http.post(f"{api}/upload", files={"files": ("digit.png", data, "image/png")})
            upload.raise_for_status()
            file_data = {"path": upload.json()[0], "meta": {"_type": "gradio.FileData"}}
            event = local.http.post(f"{api}/call/predict", json={"data": [file_data]})
            event.raise_for_status()
            stream = local.http.get(f"{api}/call/predict/{event.json()['event_id']}").text
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return time.perf_counter() - started, None, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        if malformed:
            handled = "event: error" in stream and '"error"' in stream  # a message the client can read
            return elapsed, None, None if handled else f"malformed request not rejected: {stream[:200]!r}"
        if "event: complete" not in stream or f'"label": "{expected}"' not in stream:
            return elapsed, None, f"unexpected answer: {stream[:200]!r}"
        found = re.search(r"in ([\d.]+) ms", stream)
        return elapsed, float(found.group(1)) if found else None, None

    demo = ["demo", str(export_dir), "--port", str(port), "--provider", "cpu"]
    with toolkit_server(demo, ready_url=url) as server:
        call(0)  # warm-up
        memory_before = rss_mb(server.pid)
        log(f"{clients} clients, {requests} requests against http://127.0.0.1:{port}/")
        started = time.perf_counter()
        samples.append({"requests": 0, "seconds": 0.0, "rss_mb": memory_before or 0.0})

        def sampled_call(index: int) -> tuple[float, float | None, str | None]:
            outcome = call(index)
            count = next(finished)
            if sample_every and count % sample_every == 0 and (rss := rss_mb(server.pid)) is not None:
                samples.append({"requests": count, "seconds": time.perf_counter() - started, "rss_mb": rss})
            return outcome

        with ThreadPoolExecutor(max_workers=clients) as executor:
            outcomes = list(executor.map(sampled_call, range(requests)))
        wall = time.perf_counter() - started
        memory_after = rss_mb(server.pid)
    latencies = [o[0] for o in outcomes if o[2] is None and o[1] is not None]
    server_ms = [o[1] for o in outcomes if o[1] is not None]
    errors = [o[2] for o in outcomes if o[2] is not None]
    return {
        "kind": "serve", "machine": machine(), "clients": clients, "requests": requests,
        "malformed_requests": requests // malformed_every if malformed_every > 0 else 0, "errors": len(errors),
        "error_examples": errors[:5], "throughput_rps": requests / wall,
        "p50_ms": percentile_us(latencies, 50) / 1000 if latencies else None,
        "p95_ms": percentile_us(latencies, 95) / 1000 if latencies else None,
        "p99_ms": percentile_us(latencies, 99) / 1000 if latencies else None,
        "server_side_p50_ms": statistics.median(server_ms) if server_ms else None,
        "server_side_p99_ms": float(np.percentile(server_ms, 99)) if server_ms else None,
        "server_rss_mb_before": memory_before, "server_rss_mb_after": memory_after,
        **({"sample_every": sample_every, "rss_samples": sorted(samples, key=lambda s: s["requests"]),
            "rss_slope_mb_per_1000": rss_slope(samples),
            "rss_slope_second_half_mb_per_1000": rss_slope([s for s in samples if s["requests"] >= requests / 2])}
           if sample_every else {}),
    }
