"""The server's Prometheus counts: requests by model, protocol and status, their latency, and
the dynamic batches (summed over `--workers` through prometheus_client's multiprocess mode)."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("toolkit.serve")


def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "in_flight": Gauge("toolkit_requests_in_flight", "Inference requests received and not yet answered",
                           ["model", "protocol"], multiprocess_mode="livesum"),
        "requests": Counter("toolkit_requests", "Inference requests by model, protocol (rest, grpc) and status "
                            "(an HTTP status, or a gRPC status code's name)", ["model", "protocol", "status"]),
        "latency": Histogram("toolkit_request_seconds", "Inference request latency, received to answered",
                             ["model", "protocol"],
                             buckets=(.001, .002, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 5)),
        "batch_images": Histogram("toolkit_batch_images", "Images per model run (dynamic batching)",
                                  buckets=tuple(2.0 ** k for k in range(13))),
        "batch_requests": Histogram("toolkit_batch_requests", "Requests merged into one model run",
                                    buckets=tuple(2.0 ** k for k in range(9))),
    }


METRICS = _metrics()


@functools.cache
def _series(metric: str, *labels: str) -> Any:
    """One labelled series of a metric; looking one up by its labels costs more than counting."""
    return METRICS[metric].labels(*labels)


class Tally:
    """One inference request of `model`: in flight from now until `finish`, which counts it by
    status and times it."""

    def __init__(self, model: str, protocol: str) -> None:
        self.model, self.protocol, self.started = model, protocol, time.perf_counter()
        _series("in_flight", model, protocol).inc()

    def finish(self, status: str) -> None:
        seconds = time.perf_counter() - self.started
        _series("in_flight", self.model, self.protocol).dec()
        _series("requests", self.model, self.protocol, status).inc()
        _series("latency", self.model, self.protocol).observe(seconds)
        log.debug("%s %s %s %.1f ms", self.protocol, self.model, status, 1000 * seconds)


@contextlib.contextmanager
def counted(model: str, protocol: str) -> Iterator[dict[str, str]]:
    """A `Tally` of the block, by the status the block sets on the yielded dict (500 if none)."""
    outcome = {"status": "500"}
    tally = Tally(model, protocol)
    try:
        yield outcome
    finally:
        tally.finish(outcome["status"])


def count_batch(images: int, requests: int) -> None:
    """One run of the model: how many images, merged from how many requests."""
    METRICS["batch_images"].observe(images)
    METRICS["batch_requests"].observe(requests)
