"""The control port: all the operator channel may read of the worker and ask it to do.

``commands`` and ``control`` depend on this Protocol (and on plain values), never on the
worker, which implements it structurally (``mypy --strict`` checks that where the worker hands
itself to ``ControlServer``). Reads are snapshots kept in memory, or computed off the event loop;
none waits on delivery, DNS or a remote server. An envelope the worker does not know is
``NoSuchEnvelope`` (404); any other exception out of the port is a bug and answered 500.

The actions that take an envelope id (``hold``, ``release``, ``flush``) are called only for
ids in ``index``; ``result`` raises ``NoSuchEnvelope`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from spoolsmtp.control.tracer import Tracer
from spoolsmtp.model.config import Config
from spoolsmtp.model.record import State
from spoolsmtp.model.stats import Stats
from spoolsmtp.spool.nodes import Adopted

# the folders QUERY counts on disk (the other states are the worker's own index)
COUNTED = ("incoming", "rejected", "bounces", "deadletter")


class NoSuchEnvelope(Exception):
    """A command named an envelope the worker does not know (or no longer queues)."""

    def __init__(self, envelope_id: str, what: str = "envelope") -> None:
        self.envelope_id = envelope_id
        super().__init__(f"no {what} {envelope_id}")


@dataclass(frozen=True)
class Traffic:
    """Connection and DNS counters since start (STATS)."""

    connections_opened: int = 0
    connections_reused: int = 0
    tls_sessions: int = 0
    bytes_sent: int = 0
    dns_lookups: int = 0
    dns_cache_hits: int = 0
    dns_queries: int = 0


@dataclass(frozen=True)
class Reloaded:
    """What RELOAD did: the keys whose value changed, and those of them that keep their old
    value until a restart."""

    source: str
    changed: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        said = f"{self.source} reloaded"
        if self.restart:
            said += "; needs a restart to take effect: " + ", ".join(self.restart)
        return said


class Queued(Protocol):
    """What the operator sees of one envelope in the queue (active, deferred or held)."""

    @property
    def id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def state(self) -> State: ...
    @property
    def received(self) -> float: ...
    @property
    def next_attempt(self) -> float | None: ...
    @property
    def destinations(self) -> Mapping[str, int]: ...  # destination key -> recipients left


class Disk(Protocol):
    """Whether the spool has room: since when it has not, and why."""

    @property
    def since(self) -> float | None: ...
    @property
    def reason(self) -> str: ...
    @property
    def full(self) -> bool: ...


class ControlPort(Protocol):
    """What HELP, QUERY, STATS, TRACE, HOLD, RELEASE, FLUSH, EXPIRE, SUSPEND, RESUME, RELOAD
    and SHUTDOWN need of the worker."""

    # -- snapshots -----------------------------------------------------------------------------
    @property
    def cfg(self) -> Config: ...
    @property
    def index(self) -> Mapping[str, Queued]: ...
    @property
    def suspended(self) -> bool: ...
    @property
    def disk(self) -> Disk: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def tracer(self) -> Tracer: ...

    def traffic(self) -> Traffic: ...

    async def folder_counts(self) -> Mapping[str, int]:
        """Files in each of ``COUNTED``, counted off the event loop."""
        ...

    async def result(self, envelope_id: str) -> dict[str, Any]:
        """The envelope's result record as JSON data; ``NoSuchEnvelope`` if it has none."""
        ...

    def dead_destinations(self) -> Mapping[str, float]:
        """Destination keys not tried until the given time."""
        ...

    def destination_key(self, domain: str) -> str:
        """The destination a recipient domain is routed to (routing is the worker's)."""
        ...

    # -- actions -------------------------------------------------------------------------------
    async def hold(self, envelope_id: str) -> str: ...
    async def release(self, envelope_id: str) -> str: ...
    def flush(self, envelope_id: str | None = None, destination: str | None = None) -> int: ...
    def expire(self, domain: str) -> bool: ...
    def suspend(self) -> None: ...
    def resume(self) -> None: ...
    def reload(self) -> Reloaded:
        """Read the configuration again; ``ConfigError`` (and nothing changed) if it is bad."""
        ...

    def stop(self) -> None: ...
    async def adopt(self, node: str) -> Adopted:
        """Take over a dead node's work (``NodeAlive``, ``NoSuchNode``: see spool/nodes.py)."""
        ...
