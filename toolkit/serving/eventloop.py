"""The event loop the server and its load generator run on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


def event_loop_runner() -> Callable[[Awaitable[Any]], Any]:
    """uvloop's runner where it is installed (as uvicorn picks it): its event loop spends about
    a third less time per request than asyncio's."""
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.run
    return uvloop.run
