"""Which event loop runs the worker: uvloop when it is installed (``event_loop: auto``), else
asyncio's own. The worker's code is the same on both; uvloop runs the loop, its transports and
its callbacks in C, which is where a busy worker spends a large part of its time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from spoolsmtp.model.config import Config, EventLoop
from spoolsmtp.model.errors import ConfigError

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def factory(cfg: Config) -> tuple[str, LoopFactory | None]:
    """The chosen loop's name and a factory for ``asyncio.Runner`` (None: asyncio's own)."""
    if cfg.event_loop is EventLoop.ASYNCIO:
        return "asyncio", None
    try:
        import uvloop  # noqa: PLC0415 (optional: only the worker uses it, and only if present)
    except ImportError:
        if cfg.event_loop is EventLoop.UVLOOP:
            raise ConfigError(
                cfg.source, "event_loop", "uvloop is not installed (pip install uvloop)"
            ) from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def name_of(loop: asyncio.AbstractEventLoop) -> str:
    """'uvloop' or 'asyncio', for the log and STATS."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
