"""The demo server: server-side time of one request per kind of input, and load from concurrent
HTTP clients (latency, throughput, errors, memory over a soak)."""

from __future__ import annotations

import itertools
import re
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from toolkit.bench.measure import machine, percentile_us
from toolkit.core.errors import ToolkitError
from toolkit.core.locate import example_label
from toolkit.imaging.decode import load_image
from toolkit.runtime.inference import classify
from toolkit.runtime.predictor import Predictor
from toolkit.serving.launch import free_port, rss_mb, toolkit_server

MALFORMED = b"\x89PNG\r\n\x1a\n this is not an image"


def request_inputs(images: list[Path]) -> dict[str, list[Any]]:
    """What a demo server receives, built from digit image files: the uploaded files themselves,
    400x400 sketchpad canvases (black strokes on opaque white RGBA, off-centre) and 1000x1000
    photos of the digit on gray paper.
    """
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
