"""The supervisor's control port: the operator channel's ``ControlPort`` for the whole of a
supervisor and its delivery processes, so the control server and its commands work unchanged.

Before each command (``WholeServer``) the port asks every child for a snapshot: its counters,
the envelopes it is delivering, its dead destinations, its disk state. The reads then answer
for the whole: counters are summed (every number and dict of numbers ``Stats`` keeps, whatever
fields it gains), the queue is the supervisor's deferred and held envelopes with the children's
active ones. HOLD and RELEASE go to the child that has the envelope (or one that moves it
between deferred/ and hold/); FLUSH, EXPIRE, SUSPEND, RESUME, RELOAD, TRACE and SHUTDOWN
reach every child.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from spoolsmtp.app import reconfig, sdnotify, wire
from spoolsmtp.app.host import Summary
from spoolsmtp.app.removal import Reboot
from spoolsmtp.control import commands
from spoolsmtp.control.port import COUNTED, Busy, NoSuchEnvelope, Reloaded, Traffic
from spoolsmtp.control.server import ControlServer, Peer
from spoolsmtp.control.tracer import Kind, Tracer
from spoolsmtp.delivery import deliverer
from spoolsmtp.delivery.route import Router
from spoolsmtp.model.config import Config
from spoolsmtp.model.config import load as config_load
from spoolsmtp.model.record import State
from spoolsmtp.model.stats import Stats
from spoolsmtp.spool import spoolview
from spoolsmtp.spool.folders import Spool
from spoolsmtp.spool.nodes import Adopted, NodeAlive, NoSuchNode

if TYPE_CHECKING:
    from spoolsmtp.app.children import Child

log = logging.getLogger("spoolsmtp")


class Supervising(Protocol):
    """What the port uses of the supervisor (app/supervisor.py), which builds the port: a
    Protocol, so that this module does not import the one that imports it."""

    cfg: Config
    own_node: str
    spool: Spool
    router: Router
    stats: Stats
    retired: Stats
    retired_traffic: dict[str, Any]
    index: dict[str, Summary]
    suspended: bool
    children: list[Child]

    def owner(self, envelope_id: str) -> Child | None: ...
    async def adopted(self, node: str) -> int: ...
    def schedule(self, envelope_id: str, when: float) -> None: ...
    def unschedule(self, envelope_id: str) -> None: ...
    def resume_work(self) -> None: ...
    def stop(self) -> None: ...


SNAPSHOT_TIMEOUT = 5.0
ADOPT_TIMEOUT = 300.0


class WholeStats(Stats):
    """The children's counters added up; rate and latency from their own figures."""

    def __init__(self, parts: list[dict[str, Any]], started: float) -> None:
        super().__init__(started=started)
        total = wire.summed((p.get("stats", {}) for p in parts), started)
        for f in dataclasses.fields(Stats):
            if not f.name.startswith("_"):
                setattr(self, f.name, getattr(total, f.name))
        self._rate = sum(float(p.get("rate", 0.0)) for p in parts)
        self._samples: list[float] = sorted(x for p in parts for x in p.get("latencies", ()))

    def rate(self, window: float = 60.0, now: float | None = None) -> float:
        return self._rate

    def latency(self, quantile: float) -> float | None:
        if not self._samples:
            return None
        return self._samples[min(len(self._samples) - 1, int(quantile * len(self._samples)))]


@dataclasses.dataclass(frozen=True)
class DiskView:
    """A full disk as any child sees it."""

    since: float | None = None
    reason: str = ""
    full: bool = False


class FanTracer(Tracer):
    """TRACE and NOTRACE reach every child; the lines they trace come back to be followed."""

    def __init__(self, children: list[Child]) -> None:
        self._children: list[Child] = []
        super().__init__()
        self._children = children

    @property
    def enabled(self) -> set[Kind]:
        return self._enabled

    @enabled.setter
    def enabled(self, kinds: set[Kind]) -> None:
        self._enabled = set(kinds)
        for child in self._children:
            child.send("o", [0, "trace", sorted(k.value for k in kinds)])

    def relay(self, line: str) -> None:
        """A line a child traced (and logged): to the ring and the followers."""
        self.ring.append(line)
        for queue in self._followers:
            try:
                queue.put_nowait(line)
            except asyncio.QueueFull:
                self.dropped += 1


class Whole:
    """The ``ControlPort`` of a supervisor (checked where it is handed to ``WholeServer``)."""

    def __init__(self, sup: Supervising) -> None:
        self._sup = sup
        self.tracer = FanTracer(sup.children)
        self._started = time.time()
        self._counts = spoolview.FolderCounts({n: sup.spool.dirs[n] for n in COUNTED})
        self._expired: dict[str, bool] = {}
        self._merged: dict[str, Summary] | None = None

    # -- snapshots -------------------------------------------------------------------------

    async def refresh(self, verb: str, args: list[str]) -> None:
        """Ask every running child for its snapshot (and, for EXPIRE, do it there first)."""
        children = [c for c in self._sup.children if c.up]
        if verb == "EXPIRE" and len(args) == 1:
            said = await asyncio.gather(*(c.ask("expire", args[0]) for c in children))
            self._expired[args[0]] = any(x is True for x in said)
        snaps = await asyncio.gather(*(c.ask("snap", timeout=SNAPSHOT_TIMEOUT) for c in children))
        for child, snap in zip(children, snaps, strict=True):
            if isinstance(snap, dict) and "stats" in snap:
                child.snapshot = snap
                child.counters = {k: snap[k] for k in ("stats", "traffic") if k in snap}
                if child.silent:
                    child.silent = False
                    log.info("delivery process %s answers again", child.name)
            elif child.up and not child.silent:  # once per episode: stopped, or stuck
                child.silent = True
                log.warning(
                    "delivery process %s (pid %s) did not answer within %.0f s (stopped or "
                    "stuck?); what it has in hand waits for it, and its figures are its last",
                    child.name,
                    child.proc.pid if child.proc is not None else "?",
                    SNAPSHOT_TIMEOUT,
                )
        self._merged = None

    def _parts(self) -> list[dict[str, Any]]:
        return [c.snapshot for c in self._sup.children if c.snapshot]

    @property
    def cfg(self) -> Config:
        return self._sup.cfg

    @property
    def index(self) -> Mapping[str, Summary]:
        """The supervisor's deferred and held envelopes and the children's active ones, as
        of the last refresh (made once per command: HOLD ALL asks it once per envelope)."""
        if self._merged is None:
            self._merged = self._merge()
        return self._merged

    def _merge(self) -> dict[str, Summary]:
        merged: dict[str, Summary] = {}
        for child in self._sup.children:
            for row in child.snapshot.get("index", ()):
                envelope_id, source, state, received, due, dests = row
                merged[envelope_id] = Summary(
                    envelope_id, source, State(state), received, due, dests
                )
        for envelope_id, summary in self._sup.index.items():
            if summary.state is not State.ACTIVE or envelope_id not in merged:
                merged[envelope_id] = summary
        return merged

    @property
    def suspended(self) -> bool:
        return self._sup.suspended

    @property
    def disk(self) -> DiskView:
        for part in self._parts():
            since, reason, full = part.get("disk", (None, "", False))
            if full or since is not None:
                return DiskView(since, reason, bool(full))
        return DiskView()

    @property
    def stats(self) -> Stats:
        own = {"stats": wire.counters(self._sup.stats)}
        retired = {"stats": wire.counters(self._sup.retired)}
        return WholeStats([*self._parts(), own, retired], self._started)

    def traffic(self) -> Traffic:
        parts = [p.get("traffic", {}) for p in self._parts()]
        summed = wire.add_up([*parts, self._sup.retired_traffic])
        names = {f.name for f in dataclasses.fields(Traffic)}
        return Traffic(**{k: v for k, v in summed.items() if k in names})

    async def folder_counts(self) -> Mapping[str, int]:
        return await self._counts.counts()

    async def result(self, envelope_id: str) -> dict[str, Any]:
        found = await spoolview.result(self._sup.spool.path("results", f"{envelope_id}.json"))
        if found is None:
            raise NoSuchEnvelope(envelope_id)
        return found

    def dead_destinations(self) -> Mapping[str, float]:
        now = time.time()
        dead: dict[str, float] = {}
        for part in self._parts():
            for key, until in part.get("dead", {}).items():
                if until > now:
                    dead[key] = max(dead.get(key, 0.0), until)
        return dead

    def destination_key(self, domain: str) -> str:
        return self._sup.router.destination(domain).key

    # -- actions ---------------------------------------------------------------------------

    def _holder(self, envelope_id: str) -> list[Child]:
        """The child delivering it (or every running child, if none is known)."""
        for child in self._sup.children:
            if any(row[0] == envelope_id for row in child.snapshot.get("index", ())):
                return [child]
        return [c for c in self._sup.children if c.up]

    def _any(self) -> Child:
        up = [c for c in self._sup.children if c.up]
        if not up:
            raise RuntimeError("no delivery process is running; try again shortly")
        return min(up, key=lambda c: len(c.outstanding))

    async def hold(self, envelope_id: str) -> str:
        summary = self.index.get(envelope_id)
        if summary is None:
            raise NoSuchEnvelope(envelope_id, "queued envelope")
        if summary.state is State.HELD:
            return f"{envelope_id} is already held"
        if summary.state is State.DEFERRED:
            self._sup.unschedule(envelope_id)
            said = await self._any().ask("move", envelope_id, "deferred", "hold")
            if said is True:
                own = self._sup.index.get(envelope_id)
                if own is not None:
                    own.state, own.next_attempt = State.HELD, None
                return f"{envelope_id} held"
            if not self._sup.spool.envelope("deferred", envelope_id).exists():
                return await self._hold_active(envelope_id)
            self._sup.schedule(envelope_id, summary.next_attempt or time.time())
            raise RuntimeError(f"{envelope_id} could not be held: {_why(said)}")
        return await self._hold_active(envelope_id)

    async def _hold_active(self, envelope_id: str) -> str:
        owner = self._sup.owner(envelope_id)  # a retry handed out, maybe not yet taken
        if owner is not None:
            said = [await owner.ask("hold_active", envelope_id, True)]
        else:
            children = self._holder(envelope_id)
            said = await asyncio.gather(*(c.ask("hold_active", envelope_id) for c in children))
        for text in said:
            if isinstance(text, str):
                return text
        return f"{envelope_id} is being delivered; it will be held after this attempt"

    async def release(self, envelope_id: str) -> str:
        summary = self.index.get(envelope_id)
        if summary is None:
            raise NoSuchEnvelope(envelope_id, "queued envelope")
        if summary.state is State.ACTIVE:
            said = await asyncio.gather(
                *(c.ask("unhold", envelope_id) for c in self._holder(envelope_id))
            )
            for text in said:
                if isinstance(text, str):
                    return text
        if summary.state is not State.HELD:
            return f"{envelope_id} is not held ({summary.state.value})"
        said_move = await self._any().ask("move", envelope_id, "hold", "deferred")
        if said_move is not True:
            raise RuntimeError(f"{envelope_id} could not be released: {_why(said_move)}")
        self._sup.schedule(envelope_id, time.time())
        return f"{envelope_id} released"

    def flush(self, envelope_id: str | None = None, destination: str | None = None) -> int:
        now = time.time()
        count = 0
        key = self.destination_key(destination) if destination is not None else None
        for summary in list(self._sup.index.values()):
            if summary.state is not State.DEFERRED:
                continue
            if envelope_id is not None and summary.id != envelope_id:
                continue
            if key is not None and key not in summary.destinations:
                continue
            self._sup.schedule(summary.id, now)
            count += 1
        if envelope_id is None:
            for child in self._sup.children:
                child.send("o", [0, "flush", [destination]])
        return count

    def expire(self, domain: str) -> bool:
        return self._expired.pop(domain, False)

    def suspend(self) -> None:
        self._sup.suspended = True
        self._broadcast("suspend")

    def resume(self) -> None:
        self._sup.suspended = False
        self._broadcast("resume")
        self._sup.resume_work()

    def reload(self) -> Reloaded:
        """The supervisor reads the file (a bad one changes nothing anywhere); each child
        then reads it too, and keeps its share of the connection limits (a restart key)."""
        sup = self._sup
        with sdnotify.reloading_now():
            plan = reconfig.plan(sup.cfg, config_load(sup.cfg.source))
            # what a worker's RELOAD refuses, refused here before any process is told
            deliverer.usable(plan.config)
        sup.cfg = plan.config
        sup.router = type(sup.router)(plan.config)
        self._broadcast("reload")
        log.info("%s", plan.done.summary)
        return plan.done

    def stop(self) -> None:
        self._sup.stop()

    async def adopt(self, node: str) -> Adopted:
        """ADOPT: done by a child (the supervisor has no journal to carry the node's into);
        the supervisor's own node and a running child's are alive (409). The retries are
        the supervisor's: the count is that of those it did not know of (supervisor.py)."""
        if node == self._sup.own_node:
            raise NodeAlive(node)
        said = await self._any().ask("adopt", node, timeout=ADOPT_TIMEOUT)
        if isinstance(said, dict) and isinstance(said.get("adopted"), dict):
            done = Adopted(**said["adopted"])
            return dataclasses.replace(done, deferred=await self._sup.adopted(node))
        kind = said.get("kind") if isinstance(said, dict) else None
        if kind == NodeAlive.__name__:
            raise NodeAlive(node)
        if kind == NoSuchNode.__name__:
            raise NoSuchNode(node)
        raise RuntimeError(f"node {node!r} was not adopted: {_why(said)}")

    # -- the operator's removals and REBOOT ----------------------------------------------------

    async def bounce(self, envelope_id: str, uid: int) -> str:
        return await self._remove(envelope_id, uid, report=True, keep=True)

    async def delete(self, envelope_id: str, uid: int, *, report: bool) -> str:
        return await self._remove(envelope_id, uid, report=report, keep=False)

    async def _remove(self, envelope_id: str, uid: int, *, report: bool, keep: bool) -> str:
        """A queued envelope is the supervisor's: it stops scheduling it, and one delivery
        process takes it back into its active/ and fails it there (removal.py)."""
        sup = self._sup
        summary = sup.index.get(envelope_id)
        if summary is None or summary.state not in (State.DEFERRED, State.HELD):
            if summary is not None or envelope_id in self.index:
                raise Busy(envelope_id)  # being delivered by one of the processes
            raise NoSuchEnvelope(envelope_id, "queued envelope")
        if sup.owner(envelope_id) is not None:
            raise Busy(envelope_id)  # a retry handed out, maybe not yet taken
        sup.unschedule(envelope_id)
        said = await self._any().ask("remove", envelope_id, summary.state.value, uid, report, keep)
        if isinstance(said, str):
            sup.index.pop(envelope_id, None)
            return said
        if summary.state is State.DEFERRED:  # not removed: it stays queued as it was
            sup.schedule(envelope_id, summary.next_attempt or time.time())
        if isinstance(said, dict) and said.get("kind") == Busy.__name__:
            raise Busy(envelope_id)
        raise RuntimeError(f"{envelope_id} was not removed: {_why(said)}")

    def reboot(self, uid: int) -> None:
        """REBOOT: the supervisor drains its processes and re-executes itself (cli)."""
        Reboot.request(self._sup.stop, uid)

    def _broadcast(self, op: str) -> None:
        for child in self._sup.children:
            child.send("o", [0, op, []])


def _why(said: Any) -> str:
    if isinstance(said, dict) and "error" in said:
        return str(said["error"])
    return "no delivery process answered"


class WholeServer(ControlServer):
    """The control server, unchanged but for one step: the port's snapshots are refreshed
    before each command, so its reads (which the commands make synchronously) are current."""

    port: Whole

    def __init__(self, port: Whole, path: Any, operator_path: Any = None) -> None:
        super().__init__(port, path, operator_path)

    async def _execute(self, peer: Peer, verb: str, args: list[str]) -> commands.Answer:
        if verb in commands._HANDLERS:
            await self.port.refresh(verb, args)
        return await super()._execute(peer, verb, args)
