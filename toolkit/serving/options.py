"""How `toolkit serve` runs (`ServeOptions`, the CLI's options) and the limits it holds every
request and connection to."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from toolkit.core.contract import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS
from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.runtime.predictor import resolve_onnx_path

MAX_BODY = 64 * 1024 * 1024  # 4096 images as JSON numbers fit; anything bigger is refused unread
GRACE_SECONDS = 30  # SIGTERM: requests in flight get this long to finish
BODY_TIMEOUT_S = 20  # longest a body may take to arrive: a stalled client holds a slot for nothing
MAX_HEADER_BYTES = 64 * 1024  # a request's line and headers; nginx's default is 32 KB, uvicorn's h11 16 KB
HEADER_TIMEOUT_S = 10  # longest a request's line and headers may take to arrive (and a new connection's first byte)
INLINE_JSON_BYTES = 256 * 1024  # JSON bodies up to this are parsed on the event loop (well under 10 ms)
JSON_SLACK_VALUES = 10_000  # JSON values a request may hold beyond its tensor's: ids, parameters, outputs
# JSON objects a request may hold, counted by their '{' before it is parsed: the request, its
# inputs and outputs and their parameters. 3 million output objects held the loop 30 s.
MAX_JSON_OBJECTS = 64
QUOTED_CHARS = 100  # the most of a name, shape or value an error message quotes
# Linux spreads new connections over the sockets sharing a port with SO_REUSEPORT (other
# systems give them all to one), so each worker listens on its own. On one shared socket, the
# worker that wakes first accepts every connection waiting: 16 clients connecting at once all
# went to one worker.
SPREAD_BY_KERNEL = sys.platform.startswith("linux")
BACKLOG = 2048  # connections waiting to be accepted, as uvicorn's default
CLIENT_GONE = 499  # nginx's status for a client that closed before its answer
MAX_WORKERS = 64


@dataclass
class ServeOptions:
    """How `toolkit serve` runs an export (the CLI's options, with the same defaults)."""

    name: str | None = None  # default: the export folder's serving name
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = None
    provider: str = "auto"
    threads: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_delay_ms: float = DEFAULT_MAX_DELAY_MS
    check_integrity: bool = True
    max_body_bytes: int = MAX_BODY
    workers: int = 1
    log_requests: bool = False

    def validate(self) -> None:
        if not 1 <= self.max_batch_size <= 4096:
            raise ToolkitError(f"must be between 1 and 4096, got {self.max_batch_size}", option="max_batch_size")
        if not (math.isfinite(self.max_batch_delay_ms) and 0 <= self.max_batch_delay_ms <= 1000):
            raise ToolkitError(f"must be between 0 and 1000 ms, got {self.max_batch_delay_ms}",
                               option="max_batch_delay_ms")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.name):
            raise ToolkitError(f"must be letters, digits, '_', '.' or '-' (a URL path segment), got {self.name!r}",
                               option="name")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ToolkitError(f"must be between 1 and {MAX_WORKERS}, got {self.workers}", option="workers")
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ToolkitError(f"must differ from the HTTP port {self.port}", option="grpc_port")

    def served_name(self, export_dir: str | Path) -> str:
        """The name the export at `export_dir` is served under: `name`, else the serving name of
        the export folder (a bare .onnx file's folder). Found without loading the model; raises
        as loading it would where there is no model."""
        return self.name or Export(resolve_onnx_path(export_dir).parent).served_name
