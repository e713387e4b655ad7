"""The supervisor (``worker.processes`` > 1): it owns the spool lock, the watcher of incoming/,
the retry schedule and the control sockets, and hands envelopes to N delivery processes
(child.py), as Postfix's qmgr hands work to its smtp processes.

Each name found in incoming/ and each retry that falls due goes to the least loaded child with
room (``wire.choose``); until then it waits here, so a child that dies holds nothing but what
it had claimed, which its next start resumes from its own node area. The children say back
which envelopes left them deferred (with their due time) or held: the retry schedule and the
operator's view of the queue (schedule.py) are kept from that, from a scan of deferred/ and
hold/ at start, and from another, of what it does not know of, when a child has adopted a dead
node (that node's retries) or died before it told of what it had queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from spoolsmtp.app import adoption, capability, cpusched, reconfig, sdnotify, wire
from spoolsmtp.app.children import Child, child_command, watch_tick
from spoolsmtp.app.host import Summary
from spoolsmtp.app.schedule import Schedule
from spoolsmtp.app.whole import Whole, WholeServer
from spoolsmtp.control import metricshttp
from spoolsmtp.delivery.route import Router
from spoolsmtp.model import exitcodes
from spoolsmtp.model.config import Config
from spoolsmtp.model.config import dumps as config_dumps
from spoolsmtp.model.record import Record, State
from spoolsmtp.model.stats import Stats
from spoolsmtp.spool import diskfull, intake, nodes
from spoolsmtp.spool.folders import Spool
from spoolsmtp.spool.lock import SpoolBusy
from spoolsmtp.spool.nodes import Adopted
from spoolsmtp.spool.watcher import IncomingWatcher

log = logging.getLogger("spoolsmtp")
BURST_RESCAN = 0.25
HOUSEKEEPING = 5.0
STOP_MARGIN = 15.0


def own_node(cfg: Config) -> str:
    """The node whose lock the supervisor holds (it claims nothing into it): a second
    supervisor of this host is refused by it. Not the node a worker alone would use
    (``worker.host_id``): that one's lock stays free, so what such a worker left in flight
    before ``worker.processes`` was raised is adopted by a child (adoption.py)."""
    return f"{cfg.worker.host_id or 'local'}.supervisor"


class Supervisor:
    """The supervisor of one spool on this host."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.own_node = own_node(cfg)
        # the shared folders; "active" and "journal" are its own node's, which stay empty
        self.spool = Spool(cfg.spool, node=self.own_node)
        self.router = Router(cfg)
        self.stats = Stats()  # its own counts (names refused); the children keep the rest
        self.retired = Stats()  # the last counts of delivery processes that died
        self.retired_traffic: dict[str, Any] = {}  # and their traffic counters
        self.queue = Schedule(self.spool, self.summarise)
        self.index = self.queue.index  # the operator's view (whole.py)
        self.suspended = False
        self._waiting: collections.deque[tuple[str, str]] = collections.deque()
        self._names: set[str] = set()  # names waiting here or handed out
        self._refused: set[str] = set()
        self._learning: dict[str, asyncio.Task[int]] = {}  # by node: after its adoption
        self._tasks: set[asyncio.Task[int]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._rescan: asyncio.TimerHandle | None = None
        self._pumping = False
        self.watcher: IncomingWatcher | None = None
        # what a child may have been handed and not finished: twice its share of the
        # envelopes in flight, so it never waits for the next while the rest wait here
        self.room = max(2 * cfg.spool.max_active // max(cfg.worker.processes, 1), 1)
        names = nodes.delivery_nodes(cfg)
        source = str(cfg.source)
        sched = cpusched.current()  # what the processes deliver under (the supervisor: batch)
        self.children = [
            Child(
                k,
                name,
                child_command(source, name, len(names), k, sched),
                lambda: config_dumps(self.cfg),
                self._report,
                self._lost,
            )
            for k, name in enumerate(names)
        ]
        self.port = Whole(self)

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        small = wire.too_small(
            {
                "delivery.max_connections": self.cfg.delivery.max_connections,
                "delivery.max_per_destination": self.cfg.delivery.max_per_destination,
                "spool.max_active": self.cfg.spool.max_active,
            },
            len(self.children),
        )
        if small:
            log.error(
                "%s: %s below worker.processes (%d): each process needs one",
                self.cfg.source,
                " and ".join(small),
                len(self.children),
            )
            return exitcodes.CONFIG
        started = cpusched.supervise()
        lock = nodes.lock(self.cfg.spool, self.own_node)
        try:
            lock.acquire()
        except SpoolBusy as exc:
            log.error("%s", exc)
            return exitcodes.TEMPFAIL
        try:
            return await self._run()
        finally:
            lock.release()
            cpusched.back_to(started)  # a REBOOT re-executes it: under its first policy

    async def _run(self) -> int:
        diskfull.check_writable(self.spool.dirs.values())
        self.spool.ensure()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, reconfig.on_hangup, self.port.reload)
        # a port it cannot bind stops it too; each answer asks the processes for their counters
        metrics = await metricshttp.serve(self.port, lambda: self.port.refresh("METRICS", []))
        control = WholeServer(self.port, self.cfg.control_socket, self.cfg.operator_socket)
        await control.start()
        self.queue.enter(await asyncio.to_thread(lambda: self.queue.read(self.queue.listed())))
        try:  # they claim other users' files: the lease that keeps a written one is theirs
            capability.pass_on_lease()
        except OSError as exc:
            log.warning("%s: a file of another user still open for writing can be taken", exc)
        for child in self.children:
            child.start()
        # each child's task runs to its Popen now: their start (a Python's imports) then
        # overlaps the rescan below, which holds the loop while it looks at a backlog's names
        await asyncio.sleep(0)
        self.watcher = IncomingWatcher(
            self.spool.dirs["incoming"],
            self.cfg.spool.settle_seconds,
            self._found,
            known=self._names.__contains__,
            refused=self._refuse,
        )
        self.watcher.start()
        self.watcher.rescan()
        background = [
            asyncio.create_task(self._retries()),
            asyncio.create_task(self._chores()),
            asyncio.create_task(self._watchdog()),
        ]
        log.info(
            "supervising %d delivery processes (%s); %d deferred, %d held; spool %s",
            len(self.children),
            ", ".join(c.name for c in self.children),
            len(self.queue),
            sum(1 for s in self.index.values() if s.state is State.HELD),
            self.cfg.spool.path,
        )
        log.info("ready")
        sdnotify.ready()
        watchdog = asyncio.create_task(sdnotify.watchdog())  # pings until the very end
        await self._stopping.wait()
        sdnotify.stopping()
        log.info("stopping: draining %d delivery processes", len(self.children))
        self.watcher.stop()
        await control.close()
        if metrics is not None:
            await metrics.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        timeout = self.cfg.shutdown_timeout + STOP_MARGIN
        await asyncio.gather(*(c.stop(timeout) for c in self.children))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        watchdog.cancel()
        log.info("stopped")
        return 0

    def stop(self) -> None:
        self._stopping.set()

    # -- the queue: deferred and held envelopes, due times ----------------------------------

    def _known(self) -> Callable[[str], bool]:
        return self.queue.known(key for kind, key in self._waiting if kind == "r")

    async def _take_in(self, why: str) -> int:
        """deferred/ and hold/ may hold envelopes the supervisor does not know of (``why``).
        Those, and only those, are taken in: a retry scheduled, or handed to a child that has
        not yet taken it out of deferred/, stays as it is. How many retries it scheduled."""
        try:
            known = self._known()
            listed = [x for x in await asyncio.to_thread(self.queue.listed) if not known(x[0])]
            found = await asyncio.to_thread(self.queue.read, listed)
        except OSError as exc:
            log.error("%s, but cannot read deferred/ and hold/: %s", why, exc)
            return 0
        known = self._known()  # again: the children may have told of some meanwhile
        count = self.queue.enter(x for x in found if not known(x[0]))
        if count:
            self._wake.set()
        return count

    async def _learn(self, node: str, envelopes: int) -> int:
        """A child adopted ``node``: what that node had deferred or held is taken in. Logs
        the adoption; how many retries it scheduled."""
        retries = await self._take_in(f"adopted node {nodes.shown(node)}")
        adoption.note(Adopted(node, envelopes, retries))
        return retries

    async def _untold(self, child: str, why: str) -> int:
        """Envelopes put in deferred/ or hold/ by a process that did not say so: one that
        died before it did (its reports go once per turn of its loop), or, when a process
        starts on its node, the one that had that node before it (a process of an earlier
        supervisor, killed, that went on draining what it had in flight while this one
        loaded the queue; the node's lock kept ours from starting until it was gone). Taken
        in now, not at the next start of a supervisor."""
        count = await self._take_in(f"delivery process {child} {why}")
        if count:
            log.info(
                "%d retries in deferred/ no process had told of (delivery process %s %s); "
                "scheduled here",
                count,
                child,
                why,
            )
        return count

    def _spawn(self, work: Coroutine[Any, Any, int]) -> asyncio.Task[int]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def adopted(self, node: str) -> int:
        """The retries the last adoption of ``node`` scheduled, for the operator's ADOPT (the
        child that adopted it told the supervisor so before it answered)."""
        task = self._learning.pop(node, None)
        return 0 if task is None else await task

    def summarise(self, rec: Record, state: State, due: float | None) -> Summary:
        return Summary.of(rec, state, due, self.router.destination)

    def schedule(self, envelope_id: str, when: float) -> None:
        self.queue.schedule(envelope_id, when)
        self._wake.set()

    def resume_work(self) -> None:
        """RESUME: due retries and waiting names are handed out again."""
        self._wake.set()
        self._pump()
        self._rescan_soon()

    def owner(self, envelope_id: str) -> Child | None:
        """The child a retry of it was handed to, until that child reports on it."""
        return self.queue.handed.get(envelope_id)

    def unschedule(self, envelope_id: str) -> None:
        self.queue.unschedule(envelope_id)

    async def _retries(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            if not self.suspended:
                self._waiting.extend(("r", envelope_id) for envelope_id in self.queue.due(now))
            self._pump()
            upcoming = self.queue.next_due()
            delay = upcoming - now if upcoming is not None and not self.suspended else 3600.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(delay, 3600.0))):
                    await self._wake.wait()

    # -- handing out -------------------------------------------------------------------------

    def _found(self, name: str) -> None:
        if name not in self._names:
            self._names.add(name)
            self._waiting.append(("c", name))
            if not self._pumping:  # once per turn of the loop: a burst comes many at a time
                self._pumping = True
                asyncio.get_running_loop().call_soon(self._pump)

    def _refuse(self, name: str, why: str) -> None:
        if name not in self._refused:
            self._refused.add(name)
            self.stats.files_refused += 1
            log.warning("incoming/%s is left alone: %s", intake.shown(name), why)

    def _pump(self) -> None:
        """Hand waiting work to the least loaded children while any has room."""
        self._pumping = False
        if self.suspended or self._stopping.is_set():
            return
        claims = False
        while self._waiting:
            loads = [len(c.outstanding) if c.up else None for c in self.children]
            index = wire.choose(loads, self.room)
            if index is None:
                return
            child = self.children[index]
            kind, key = self._waiting.popleft()
            child.outstanding.add(f"{kind}:{key}")
            child.send(kind, key)
            if kind == "r":
                self.queue.hand(key, child)
            else:
                claims = True
        if claims and self.watcher is not None and self.watcher.may_miss:
            self._rescan_soon()

    def _rescan_soon(self) -> None:
        """Look at incoming/ again soon: after a burst where the watcher may miss events
        unsaid (watchdog's observer), and when a process died with names it had not claimed."""
        if self._rescan is None:
            loop = asyncio.get_running_loop()
            self._rescan = loop.call_later(BURST_RESCAN, self._burst_rescan)

    def _burst_rescan(self) -> None:
        self._rescan = None
        if self.watcher is not None and not self.suspended and not self._stopping.is_set():
            self.watcher.rescan()

    async def _chores(self) -> None:
        every = min(self.cfg.spool.rescan_interval, HOUSEKEEPING)
        last = time.monotonic()
        while True:
            await asyncio.sleep(every)
            for child in self.children:
                child.steady()
            if time.monotonic() - last >= self.cfg.spool.rescan_interval:
                last = time.monotonic()
                self._refused = {n for n in self._refused if self._in_incoming(n)}
                if self.watcher is not None and not self.suspended:
                    self.watcher.rescan()

    def _in_incoming(self, name: str) -> bool:
        return os.path.lexists(self.spool.path("incoming", name))

    async def _watchdog(self) -> None:
        """Every tick, each child that has been quiet is pinged, and one quiet for
        ``worker.watchdog`` is killed and started again (``Child.watch``). Whatever a tick
        comes later than asked is time the supervisor itself did not run (stopped, starved of
        CPU), when what the children said is still unread: it is not held against them. A
        timeout changed by RELOAD starts every child's count afresh, so that a quiet spell that
        was fine under the old one is not judged by the new one (each process answers the
        RELOAD itself, so this matters only for one that answered it late)."""
        last = time.monotonic()
        timeout = self.cfg.worker.watchdog
        while True:
            tick = watch_tick(timeout)
            await asyncio.sleep(tick)
            now = time.monotonic()
            late, last = max(0.0, now - last - tick), now
            if self.cfg.worker.watchdog != timeout:  # RELOAD changed it
                timeout = self.cfg.worker.watchdog
                late = now  # all forgiven
            for child in self.children:
                if late:
                    child.forgive(late, now)
                child.watch(now, timeout)

    # -- what the children say ---------------------------------------------------------------

    def _report(self, child: Child, batch: dict[str, list[Any]]) -> None:
        for row in batch.get("s", ()):
            envelope_id, source, state, received, due, dests = row
            summary = Summary(envelope_id, source, State(state), received, due, dests)
            self.index[envelope_id] = summary
            self.queue.handed.pop(envelope_id, None)
            if summary.state is State.DEFERRED:
                self.schedule(envelope_id, due if due is not None else time.time())
        for name in batch.get("n", ()):
            child.outstanding.discard(f"c:{name}")
            self._names.discard(name)
        for envelope_id in batch.get("i", ()):
            child.outstanding.discard(f"r:{envelope_id}")
            if self.queue.handed.pop(envelope_id, None) is not None:
                self.queue.gone(envelope_id)
        for node, envelopes in batch.get("d", ()):
            self._learning[node] = self._spawn(self._learn(node, envelopes))
        for line in batch.get("t", ()):
            self.port.tracer.relay(line)
        for counters in batch.get("c", ()):
            child.counters = counters
        if "h" in batch:
            self._spawn(self._untold(child.name, "started"))
        if "up" in batch:  # a fresh process: what the operator set holds for it too
            if self.port.tracer.enabled:
                child.send("o", [0, "trace", sorted(k.value for k in self.port.tracer.enabled)])
            if self.suspended:
                child.send("o", [0, "suspend", []])
        if "n" in batch or "i" in batch or "up" in batch:
            self._pump()

    def _lost(self, child: Child) -> None:
        """A child is gone: what it had been handed and not reported comes back here. A
        name it had not claimed is still in incoming/ (the rescan finds it); a retry it had
        not taken is still in deferred/ (retried at once); what it had taken is in its own
        area, and its next start resumes it."""
        for key in child.outstanding:
            kind, _, value = key.partition(":")
            if kind == "c":
                self._names.discard(value)
            elif self.queue.handed.pop(value, None) is not None:
                if self.spool.envelope("deferred", value).exists():
                    self.schedule(value, time.time())
                else:
                    self.queue.gone(value)
        child.outstanding.clear()
        # its counters so far stay counted (Prometheus counters never go back): its next
        # start counts from 0 again
        last = child.counters
        if last.get("stats"):
            self.retired = wire.summed(
                [wire.counters(self.retired), last["stats"]], self.retired.started
            )
        if last.get("traffic"):
            self.retired_traffic = wire.add_up([self.retired_traffic, last["traffic"]])
        child.snapshot, child.counters, child.silent = {}, {}, False
        if not self._stopping.is_set():
            self._rescan_soon()
            self._spawn(self._untold(child.name, "died"))
