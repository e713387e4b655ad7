"""A delivery process of a supervisor (``worker.processes`` > 1): a worker on its own node
(its own active/ and journal/, its own liveness lock) with no watcher and no control socket.

The supervisor hands it names in incoming/ to claim and deferred ids to retry (wire.py); it
claims by rename into its own active area, so each envelope is owned by one process at a time,
and says back what the supervisor needs: which claims and retries are over, and which
envelopes left it deferred (with their due time) or held. Everything else is the worker's, as
in one process: the journal, the resume after a crash, the put-backs, the reports.

It stops when the supervisor says so, when its link reaches EOF, or (PR_SET_PDEATHSIG) when
the supervisor dies: what it had in flight is resumed by the next process on its node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from typing import Any

from spoolsmtp.app import reconfig, wire
from spoolsmtp.app.adoption import Adoption
from spoolsmtp.app.host import Summary
from spoolsmtp.app.link import Link
from spoolsmtp.app.worker import Worker
from spoolsmtp.control.tracer import Kind, Tracer
from spoolsmtp.model.config import Config
from spoolsmtp.model.record import State
from spoolsmtp.spool import crashpoint, nodes
from spoolsmtp.spool.nodes import Adopted
from spoolsmtp.spool.watcher import IncomingWatcher

log = logging.getLogger("spoolsmtp")
COUNTERS_EVERY = 1.0
PR_SET_PDEATHSIG = 1
LATENCY_SAMPLES = 1000


def die_with_parent(parent: int) -> None:
    """SIGTERM when the supervisor dies, even by kill -9 (then the link's EOF says it too)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def split(cfg: Config, children: int, index: int) -> Config:
    """This child's configuration: its share of the connection limits and of the envelopes
    in flight (wire.share), so that the whole keeps to what the file says."""
    d = cfg.delivery
    delivery = dataclasses.replace(
        d,
        max_connections=wire.share(d.max_connections, children, index),
        max_per_destination=wire.share(d.max_per_destination, children, index),
    )
    spool = dataclasses.replace(
        cfg.spool, max_active=wire.share(cfg.spool.max_active, children, index)
    )
    return dataclasses.replace(cfg, delivery=delivery, spool=spool)


class _Forwarding(Tracer):
    """Traces to this process's log, as a worker's do, and on to the supervisor's followers."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, kind: Kind, text: str) -> None:
        if kind in self.enabled:
            super().emit(kind, text)
            self._send("t", self.ring[-1])


class _NotSiblings(Adoption):
    """A child adopts what dead nodes left (a worker alone before ``worker.processes`` was
    raised, a host that died), but not its siblings': the supervisor starts a dead sibling
    again, and it resumes its own (an adoption would hold its lock and refuse that start)."""

    def __init__(self, worker: ChildWorker, siblings: set[str]) -> None:
        super().__init__(worker, worker.recovery, worker.pickup, worker.scheduler)
        self._child = worker
        self._siblings = siblings

    def _dead(self) -> list[str]:
        return [node for node in super()._dead() if node not in self._siblings]

    def adopted(self, node: str, envelopes: int) -> Adopted:
        """The retries are the supervisor's: it alone knows which it has scheduled and which
        it has handed to which process (one may be in deferred/ still, not yet taken). It is
        told that deferred/ may hold some it does not know of, the dead node's; it schedules
        those, logs the adoption and gives ADOPT its count (wire.py ``d``)."""
        self._child.link.send("d", [node, envelopes])
        return Adopted(node, envelopes, 0)


class ChildWorker(Worker):
    """The worker of one node, fed and asked by the supervisor over ``sock``."""

    def __init__(
        self,
        cfg: Config,
        node: str,
        sock: socket.socket,
        share: tuple[int, int] = (1, 0),
        siblings: tuple[str, ...] = (),
    ) -> None:
        super().__init__(cfg, node)
        self.share = share  # (children, this one's index): its part of the limits
        self.adoption = _NotSiblings(self, set(siblings))
        self.link = Link(sock, self._received)
        self.tracer = _Forwarding(self.link.send)
        self._work: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._feeding: asyncio.Task[None] | None = None
        self._ops: set[asyncio.Task[None]] = set()
        self._watching: asyncio.Task[None] | None = None
        self._pushing: asyncio.Task[None] | None = None

    # -- the worker's hooks ----------------------------------------------------------------

    async def _metrics_server(self) -> None:
        return None  # the supervisor serves metrics.listen for the whole

    def _control_server(self) -> ChildWorker:
        return self  # no socket of its own: the link is its control

    async def start(self) -> None:
        await self.link.open()
        self._watching = asyncio.create_task(self._orphaned())
        self._pushing = asyncio.create_task(self._push_counters())

    async def close(self) -> None:
        for task in (self._feeding, self._pushing):
            if task is not None:
                task.cancel()

    def counters(self) -> dict[str, Any]:
        """What it has counted since it started: kept by the supervisor if it dies."""
        return {"stats": wire.counters(self.stats), "traffic": dataclasses.asdict(self.traffic())}

    async def _push_counters(self) -> None:
        """Its counters, every ``COUNTERS_EVERY`` when they moved: a process killed loses
        at most that much of its counts (the supervisor adds a dead one's last to its own)."""
        last: dict[str, Any] | None = None
        while True:
            await asyncio.sleep(COUNTERS_EVERY)
            now = self.counters()
            if now != last:
                self.link.send("c", now)
                last = now

    def _hangup(self) -> None:
        """A SIGHUP sent to a delivery process alone: it reads the file as the supervisor's
        RELOAD has it do, keeping its share of the limits (sent to the supervisor, the
        whole reloads)."""
        reconfig.on_hangup(lambda: self.actions.reload(lambda cfg: split(cfg, *self.share)))

    def _intake(self) -> IncomingWatcher | None:
        self._feeding = asyncio.create_task(self._feed())
        # the node is ours (its lock held, what it had in flight resumed): whatever had it
        # before has exited, and what it queued is on disk for the supervisor to look at
        self.link.send("h", self.node)
        return None  # the supervisor watches incoming/ and keeps the deferred queue

    def schedule(self, envelope_id: str, when: float) -> None:
        """The retry of a deferred envelope is the supervisor's: ``_summarise`` told it."""

    def _summarise(self, record: Any, state: State, next_attempt: float | None = None) -> None:
        super()._summarise(record, state, next_attempt)
        if state is not State.ACTIVE:
            summary = self.index.pop(record.id)
            crashpoint.reach("queued_untold")
            self.link.send("s", _row(summary))

    # -- work from the supervisor ----------------------------------------------------------

    def _received(self, batch: dict[str, list[Any]]) -> None:
        for name in batch.get("c", ()):
            self._work.put_nowait(("c", name))
        for envelope_id in batch.get("r", ()):
            self._work.put_nowait(("r", envelope_id))
        for seq, op, args in batch.get("o", ()):
            task = asyncio.create_task(self._answer(seq, op, args))
            self._ops.add(task)
            task.add_done_callback(self._ops.discard)

    async def _feed(self) -> None:
        while True:
            kind, key = await self._work.get()
            await self._resumed.wait()
            await self.disk.ok.wait()
            await self._slots.acquire()
            self._spawn(self._claim(key) if kind == "c" else self._retry(key))

    async def _claim(self, name: str) -> None:
        try:
            self.pickup._queued.add(name)
            await self.pickup._take(name)
        finally:
            self.link.send("n", name)

    async def _retry(self, envelope_id: str) -> None:
        try:
            await self.scheduler._retry(envelope_id)
        finally:
            self.link.send("i", envelope_id)

    async def _orphaned(self) -> None:
        """The supervisor is gone (EOF): stop as at SIGTERM; the next one resumes the rest."""
        await self.link.closed.wait()
        if not self._stopping.is_set():
            log.warning("the supervisor is gone; stopping")
            self.stop()

    # -- the operator's requests, passed on by the supervisor -------------------------------

    async def _answer(self, seq: int, op: str, args: list[Any]) -> None:
        try:
            value = await self._do(op, args)
        except Exception as exc:
            value = {"error": f"{type(exc).__name__}: {exc}", "kind": type(exc).__name__}
        self.link.send("a", [seq, value])

    async def _do(self, op: str, args: list[Any]) -> Any:
        if op == "ping":  # the supervisor's watchdog: an answer is all it asks
            return True
        if op == "snap":
            return self.snapshot()
        if op == "hold_active":  # sure: a retry handed to it, maybe not yet begun
            envelope_id, *sure = args
            known = envelope_id in self._active or envelope_id in self.index
            if not (known or sure):
                return None
            await self.actions.hold_after(envelope_id, True)
            return f"{envelope_id} is being delivered; it will be held after this attempt"
        if op == "unhold":
            (envelope_id,) = args
            if envelope_id not in self._hold_after:
                return None
            await self.actions.hold_after(envelope_id, False)
            return f"{envelope_id} will not be held after all"
        if op == "move":  # hold <-> deferred, for HOLD and RELEASE of a queued envelope
            envelope_id, source, target = args
            await self.spool.move(envelope_id, source, target)
            state = State.DEFERRED if target == "deferred" else State.HELD
            await self.actions._restate(envelope_id, state, target)
            return True
        if op == "flush":
            (destination,) = args
            if destination is None:
                self._dead.clear()
            else:
                self._dead.pop(self._destination(destination).key, None)
            return True
        if op == "remove":  # DELETE or BOUNCE of an envelope in the supervisor's queue
            envelope_id, state, uid, report, keep = args
            return await self.actions.remove(
                envelope_id, uid, report=report, keep=keep, state=State(state)
            )
        if op == "adopt":
            return {"adopted": dataclasses.asdict(await self.adopt(args[0]))}
        if op == "expire":
            return self.expire(args[0])
        if op == "suspend":
            self.suspend()
        elif op == "resume":
            self.resume()
        elif op == "reload":
            return self.actions.reload(lambda cfg: split(cfg, *self.share)).summary
        elif op == "trace":
            self.tracer.enabled = {Kind(k) for k in args}
        elif op == "stop":
            self.stop()
        return True

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        ordered = sorted(s._latencies)
        step = max(1, len(ordered) // LATENCY_SAMPLES)
        return {
            **self.counters(),
            "rate": s.rate(60.0),
            "latencies": ordered[::step],
            "index": [_row(x) for x in self.index.values()],
            "dead": self.dead_destinations(),
            "disk": [self.disk.since, self.disk.reason, self.disk.full],
        }


def _row(summary: Summary) -> wire.SummaryRow:
    return wire.summary_row(
        summary.id,
        summary.source,
        summary.state,
        summary.received,
        summary.next_attempt,
        summary.destinations,
    )


async def _main(cfg: Config, node: str, sock: socket.socket, share: tuple[int, int]) -> int:
    siblings = tuple(nodes.delivery_nodes(cfg))
    worker = ChildWorker(split(cfg, *share), node, sock, share, siblings)
    try:
        return await worker.run()
    finally:
        await worker.link.close()


def run(
    cfg: Config, node: str, fd: int, parent: int, children: int, index: int
) -> Coroutine[Any, Any, int]:
    """The delivery process's life: the coroutine ``spoolsmtp child`` runs."""
    die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return _main(cfg, node, sock, (children, index))
