"""How the local benchmarks measure: the machine, wall times of a repeated call, percentiles.

Figures are medians over many runs, and every ratio is taken within the same run so machine
noise cancels. None of this is a test: tests only check the commands run and write valid JSON.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

TimedCall = Callable[[], Any]  # one run of the thing measured (a model on a fixed batch, ...)


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


def time_call(run: TimedCall, *, min_seconds: float = 0.5, min_repeats: int = 20, warmup: int = 10,
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
