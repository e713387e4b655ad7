"""What the worker's parts (pickup, recovery, scheduler, actions, attempt) may use of the
Worker that holds them: a ``typing.Protocol`` the Worker satisfies, so that the parts import
it, not the worker module, and the imports of ``app/`` run one way. ``Summary`` (the
operator's view of a queued envelope) lives here for the same reason."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from spoolsmtp.control.tracer import Tracer
from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.delivery.route import Destination
from spoolsmtp.model.config import Config
from spoolsmtp.model.envelope import Envelope
from spoolsmtp.model.record import Record, State, parse_iso
from spoolsmtp.model.stats import Stats
from spoolsmtp.spool.diskfull import DiskWatch
from spoolsmtp.spool.folders import Spool
from spoolsmtp.spool.journal import Journal
from spoolsmtp.spool.quarantine import Reads


@dataclass
class Summary:
    """What the operator sees of a queued envelope, kept in memory (QUERY reads only this)."""

    id: str
    source: str
    state: State
    received: float
    next_attempt: float | None = None
    destinations: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        record: Record,
        state: State,
        next_attempt: float | None,
        destination: Callable[[str], Destination],
    ) -> Summary:
        """The summary of a result record: its recipients not yet final, counted per
        destination (``destination``: a domain's, as the router finds it)."""
        destinations: dict[str, int] = {}
        for _, rec in record.recipients():
            if not rec.final:
                key = destination(rec.address.rpartition("@")[2]).key
                destinations[key] = destinations.get(key, 0) + 1
        received = parse_iso(record.received_at).timestamp()
        return cls(record.id, record.source, state, received, next_attempt, destinations)


class Serving(Protocol):
    """What the worker starts before any mail is touched and closes when it stops: the
    control server (or, in a supervisor's delivery process, its link to the supervisor)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class PutBack(Protocol):
    """Where work that failed goes to be tried again (the scheduler)."""

    def put_back(self, envelope_id: str, exc: BaseException) -> None: ...


class WorkerHost(Protocol):
    """The Worker's state and the calls its parts share."""

    cfg: Config
    spool: Spool
    stats: Stats
    tracer: Tracer
    disk: DiskWatch
    journal: Journal | None
    index: dict[str, Summary]
    suspended: bool
    resolver: MxResolver
    deliverer: Deliverer
    _reads: Reads | None
    _active: dict[str, str]
    _hold_after: set[str]
    _dead: dict[str, float]
    _resumed: asyncio.Event
    _stopping: asyncio.Event
    _slots: asyncio.Semaphore
    _legacy: bool

    @property
    def scheduler(self) -> PutBack: ...

    def schedule(self, envelope_id: str, when: float) -> None: ...

    async def _journal(self, rec: dict[str, Any]) -> None: ...

    async def _write_record(
        self, record: Record, move_to: str | None = None, *, durable: bool = False
    ) -> None: ...

    def _finished(self, envelope_id: str) -> None: ...

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def _spool_trace(self, text: str) -> None: ...

    def _destination(self, domain: str) -> Destination: ...

    def _summarise(
        self, record: Record, state: State, next_attempt: float | None = None
    ) -> None: ...

    async def _attempt(
        self, envelope_id: str, env: Envelope, record: Record, data: bytes | None
    ) -> None: ...

    async def _reports(
        self, envelope_id: str, env: Envelope, record: Record, received: datetime, now: datetime
    ) -> None: ...

    async def _send_report(
        self,
        envelope_id: str,
        tag: str,
        sender: str,
        message: bytes,
        *,
        then: list[dict[str, Any]] | None = None,
    ) -> None: ...
