"""Servers (`toolkit demo`, `toolkit serve`, a benchmark's baseline) in a subprocess: a free
port, start, wait until ready, stop.

Benchmarks and tests measure a server the way a user runs it, in its own process, and need it
to be ready before the first request, not merely started."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx

from toolkit.core.errors import ToolkitError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """The resident memory of process `pid` and its descendants (a server's workers) in MB;
    None where /proc cannot tell."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 + sum(rss_mb(child) or 0 for child in _children(pid))
    return None


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    return []


def toolkit_server(args: list[str], *, ready_url: str, ready_line: str | None = None,
                   timeout: float = 120) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """`toolkit ARGS` in a subprocess, yielded once ready (see `server_process`)."""
    return server_process(["toolkit", *args], ready_url=ready_url, ready_line=ready_line, timeout=timeout)


@contextlib.contextmanager
def server_process(module_args: list[str], *, ready_url: str, ready_line: str | None = None, timeout: float = 120,
                   env: dict[str, str] | None = None, stderr: IO[str] | int = subprocess.DEVNULL,
                   ) -> Iterator[subprocess.Popen]:
    """`python -m MODULE ARGS` in a subprocess, yielded once `ready_url` answers 200 (and, with
    `ready_line`, once a line of its output holds that text: `toolkit serve --workers` prints
    its line when every worker is up, while the URL answers once one is); stopped with SIGTERM
    (then killed) on exit; its log goes to `stderr` (nowhere by default). An early exit or a
    timeout is one ToolkitError."""
    env = {**(env or os.environ), "COLUMNS": "1000"}  # the ready line unwrapped
    process = subprocess.Popen([sys.executable, "-m", *module_args], stderr=stderr, env=env, text=True,
                               stdout=subprocess.DEVNULL if ready_line is None else subprocess.PIPE)
    what = " ".join(module_args[:2])
    try:
        deadline = time.monotonic() + timeout
        while not answers_200(ready_url):
            if process.poll() is not None:
                raise ToolkitError(f"`{what}` exited with {process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise ToolkitError(f"`{what}` was not ready at {ready_url} after {timeout:.0f} s")
            time.sleep(0.2)
        if ready_line is not None:
            while ready_line not in (line := process.stdout.readline()):  # it prints little: no pipe fills
                if not line:
                    raise ToolkitError(f"`{what}` ended its output before it printed {ready_line!r}")
        yield process
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        if process.poll() is None:
            process.kill()
            process.wait()


def answers_200(url: str) -> bool:
    """Whether a GET of `url` answers 200 now."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
