"""Worker processes that share one port: how `toolkit serve --workers N` uses more than one core.

The parent binds the listening sockets (one shared, or one per worker with SO_REUSEPORT), then
spawns the workers (fresh interpreters, as uvicorn and KServe do: an onnxruntime session does
not survive a fork, nor pickle); each builds its own models and serves on the socket it
inherits, and the kernel hands each new connection to one of them. The parent waits until every
worker is ready, replaces a worker that dies while serving, and on SIGTERM or Ctrl-C passes
SIGTERM on, so each worker finishes its requests in flight. Prometheus counts from all workers
are summed through files in a shared folder (prometheus_client's multiprocess mode), so a
scrape of any worker sees the whole server.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from typing import Any

from toolkit.core.errors import ToolkitError

log = logging.getLogger("toolkit.serve")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when a worker imports it
READY, FAILED = "ready", "failed"

# A worker's entry point: (its number, its listening socket, report) where report(READY) says it
# serves and report(FAILED, message) that it could not start. Must be importable (spawned).
WorkerMain = Callable[[int, socket.socket, Callable[..., None]], None]


class _Reporter:
    """What a worker calls to tell the parent it is ready or could not start (picklable)."""

    def __init__(self, queue: Any, index: int) -> None:
        self.queue, self.index = queue, index

    def __call__(self, state: str, message: str = "") -> None:
        self.queue.put((self.index, os.getpid(), state, message))


def _run_worker(main: WorkerMain, index: int, sock: socket.socket, report: _Reporter) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which sends SIGTERM
    threading.Thread(target=_stop_with_parent, name="parent-watch", daemon=True).start()
    main(index, sock, report)


def _stop_with_parent() -> None:
    """SIGTERM to this worker once the parent is gone (killed with SIGKILL, say), so that no
    orphaned worker goes on holding the port."""
    wait([multiprocessing.parent_process().sentinel])
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def shared_metrics_dir() -> Iterator[str]:
    """A fresh folder for the workers' metric files, named in the environment they inherit."""
    folder = tempfile.mkdtemp(prefix="toolkit-metrics-")
    previous = os.environ.get(METRICS_DIR_ENV)
    os.environ[METRICS_DIR_ENV] = folder
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(METRICS_DIR_ENV, None)
        else:
            os.environ[METRICS_DIR_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def run_workers(main: WorkerMain, sockets: list[socket.socket], *, on_ready: Callable[[], None],
                grace_seconds: float, start_timeout: float = 300) -> None:
    """Runs a copy of `main` on each of `sockets` (one socket shared, or one each) until
    SIGTERM or Ctrl-C; returns once all have stopped. A worker's replacement gets its socket,
    and the connections waiting on it. A worker that cannot start at first stops them all with its message."""

    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    processes: dict[int, Any] = {}
    stopping = False

    def start(index: int) -> None:
        process = context.Process(target=_run_worker, args=(main, index, sockets[index], _Reporter(reports, index)),
                                  name=f"toolkit-serve-worker-{index}", daemon=True)
        process.start()
        processes[index] = process

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for process in processes.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(len(sockets)):
            start(index)
        _wait_until_ready(processes, reports, len(sockets), start_timeout, lambda: stopping)  # fails: all stop
        if not stopping:
            on_ready()
        _supervise(processes, reports, start, lambda: stopping)
    finally:
        stop()
        deadline = time.monotonic() + grace_seconds + 5
        for process in processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reports.close()


def _supervise(processes: dict[int, Any], reports: Any, start: Callable[[int], None],
               stopping: Callable[[], bool]) -> None:
    """Replaces each worker that dies while the server serves, until `stopping`. One that dies
    soon after it started (an export gone, memory short) is started again after a growing
    pause (up to 30 s), so a worker that cannot start does not take the others down with it."""
    import queue

    from prometheus_client import multiprocess

    started = {index: time.monotonic() for index in processes}
    quick_deaths = dict.fromkeys(processes, 0)
    restart_at: dict[int, float] = {}
    while not stopping():
        wait([p.sentinel for i, p in processes.items() if i not in restart_at], timeout=0.5)
        with contextlib.suppress(queue.Empty):
            while True:  # a replacement's report: only a failure to start is worth a line
                index, _, state, message = reports.get_nowait()
                if state == FAILED:
                    log.warning("worker %d: %s", index, message)
        for index, process in processes.items():
            if index in restart_at or process.exitcode is None or stopping():
                continue
            multiprocess.mark_process_dead(process.pid)
            quick_deaths[index] = quick_deaths[index] + 1 if time.monotonic() - started[index] < 60 else 0
            pause = min(30.0, 0.5 * 2 ** quick_deaths[index]) if quick_deaths[index] > 1 else 0.0
            log.warning("worker %d (pid %d) exited with code %s; starting another%s", index, process.pid,
                        process.exitcode, f" in {pause:.0f} s" if pause else "")
            restart_at[index] = time.monotonic() + pause
        for index, when in list(restart_at.items()):
            if time.monotonic() >= when and not stopping():
                del restart_at[index]
                start(index)
                started[index] = time.monotonic()


def _wait_until_ready(processes: dict[int, Any], reports: Any, count: int, timeout: float,
                      stopping: Callable[[], bool]) -> None:
    """Returns once `count` of `processes` reported ready; raises with the first failure, as the
    worker said it (every worker serves the same export, so the message is the export's)."""
    import queue

    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(ready) < count and not stopping():
        try:
            index, _, state, message = reports.get(timeout=0.2)
        except queue.Empty:
            if stopping():  # a worker stopped by the signal while it started is no failure
                return
            for index, process in processes.items():
                if index not in ready and process.exitcode is not None:
                    raise ToolkitError(f"worker {index} exited with code {process.exitcode} while starting; "
                                       "its log is above") from None
            if time.monotonic() > deadline:
                raise ToolkitError(f"the workers were not ready within {timeout:.0f} s") from None
            continue
        if state == FAILED:
            raise ToolkitError(message)
        ready.add(index)
