"""Inference per backend: latency and throughput of every model of an export, and of the
Predictor, against PyTorch eager, at several batch sizes."""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.bench.measure import TimedCall, machine, percentile_us, time_call
from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.models.checkpoint import build_deployable, load_checkpoint
from toolkit.runtime.backends import export_backends
from toolkit.runtime.predictor import Predictor, check_threads, create_session

Loader = Callable[[], Callable[[np.ndarray], TimedCall]]  # builds a backend: batch -> one-batch call
SETTLE_SECONDS = 0.03
# Batches this large already show every backend's throughput; each image costs its activations
# several times over in every backend held at once, so larger ones only risk running out of memory.
MAX_BATCH = 8192


def _inference_backends(export_dir: Path, threads: int) -> dict[str, Loader]:
    """name -> loader for PyTorch eager, every backend of the export (`runtime.backends`), the
    served ONNX model with IO binding and through the Predictor, and PyTorch on CUDA where there
    is one. A loader builds the backend and returns make(batch) -> one-batch call.

    Torch modules are loaded once; onnxruntime sessions are built anew on each call, because an
    idle session's worker threads keep waking up and steal cores from the backend being timed.
    """
    torch.set_num_threads(threads)

    def torch_backend(load: Callable[[], Any], device: str = "cpu") -> Loader:
        load = functools.cache(load)

        def loader() -> Callable[[np.ndarray], TimedCall]:
            module = load()
            def make(batch: np.ndarray) -> TimedCall:
                x = torch.from_numpy(batch).to(device)
                def run() -> Any:
                    with torch.inference_mode():
                        return module(x)
                return run
            return make
        return loader

    def onnx_backend(path: Path, provider: str, io_binding: bool = False) -> Loader:
        def loader() -> Callable[[np.ndarray], TimedCall]:
            session = create_session(path, provider, threads)
            def make(batch: np.ndarray) -> TimedCall:
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
        def loader() -> Callable[[np.ndarray], TimedCall]:
            predictor = Predictor(path, provider="cpu", threads=threads)
            return lambda batch: lambda: predictor.run(batch)
        return loader

    def reference() -> torch.nn.Module:
        return build_deployable(load_checkpoint(Export(export_dir).reference))

    backends = {"pytorch-eager": torch_backend(reference)}
    for backend in export_backends(export_dir):
        if backend.provider is None:
            backends[backend.name] = torch_backend(backend.load_module)
            continue
        backends[backend.name] = onnx_backend(backend.path, backend.provider)
        if backend.format.name == "onnx" and backend.provider == "cpu":
            # The served model: also with IO binding, and through the Predictor.
            backends["onnxruntime-cpu-iobinding"] = onnx_backend(backend.path, "cpu", io_binding=True)
            backends["toolkit-predictor"] = predictor_backend(backend.path)
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
                measured = time_call(make(batch), min_seconds=min_seconds / rounds, min_repeats=max(3, 20 // rounds),
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
