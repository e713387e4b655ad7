"""Adoption: the envelopes a dead node had in flight, taken over and resumed as after a crash.

Several nodes (hosts, or processes) may share one spool, each claiming into its own area
(spool/nodes.py). A node whose lock is free and whose area holds work has died; another takes
its lock (so that no one else adopts it at the same time, and it cannot restart meanwhile) and:

1. restores from the dead node's journal the result records it had not yet made durable (not
   those another node has moved on since), and syncs them;
2. carries the journal lines of every envelope in the dead node's active/ into its own journal
   and commits them: claim, per-recipient results, dots, reports, phases, newest record;
3. renames each of those envelopes into its own active/ (each rename after that commit);
4. deletes the dead node's journal segments, whose every record is now carried or restored;
5. schedules the retries in deferred/ it did not know of (the dead node's); under a
   supervisor, which keeps the retry schedule, the supervisor does (supervisor.py);
6. resumes the envelopes exactly as its own after a crash (``Recovery.resume``): accepted
   recipients are not sent again, the section 6.1 window is counted as possible duplicates,
   reports are not repeated, and a crash while reading one is counted as such. This waits
   for free slots, so it comes last: what is known by then is not lost if we die waiting.

A crash anywhere leaves something the next adoption or restart resumes: before 3, the dead
node's area is whole (lines carried twice are the same facts); between renames, the moved
envelopes are in our active/ with their state in our journal, the rest still in the dead
node's area with its journal; before 4, the segments are carried again, harmlessly.

Adoption runs at start, every ``spool.rescan_interval`` and on the operator's ``ADOPT node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spoolsmtp.spool import crashpoint, journal, nodes, quarantine
from spoolsmtp.spool.folders import ORIGINAL, SUFFIX, Spool
from spoolsmtp.spool.journal import Replayed
from spoolsmtp.spool.lock import SpoolBusy, SpoolLock
from spoolsmtp.spool.nodes import Adopted, NodeAlive, NoSuchNode

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost
    from spoolsmtp.app.pickup import Pickup
    from spoolsmtp.app.recovery import Recovery
    from spoolsmtp.app.scheduler import Scheduler

log = logging.getLogger("spoolsmtp")


class Adoption:
    """Finds dead nodes of the spool and takes over their work (one adoption at a time)."""

    def __init__(
        self, worker: WorkerHost, recovery: Recovery, pickup: Pickup, scheduler: Scheduler
    ) -> None:
        self._w = worker
        self._recovery = recovery
        self._pickup = pickup
        self._scheduler = scheduler
        # one at a time, and no probe of a node's lock file while we hold that lock: a POSIX
        # lock is the process's, and closing any descriptor of the file would drop it
        self._one = asyncio.Lock()
        self._ready = asyncio.Event()  # the worker's journal is open: adoption may begin

    async def run(self, sweep: bool = True) -> None:
        """At start, then every ``spool.rescan_interval``: adopt every dead node with work
        (unless not ``sweep``: then only the operator's ADOPT does)."""
        w = self._w
        self._ready.set()
        while sweep:
            if not w.suspended:
                await self.sweep()
            await asyncio.sleep(w.cfg.spool.rescan_interval)

    async def sweep(self) -> list[Adopted]:
        """Adopt every other node whose lock is free and whose area holds work."""
        w = self._w
        done = []
        async with self._one:
            for node in await asyncio.to_thread(self._dead):
                try:
                    done.append(await self._adopt(node))
                except NodeAlive:
                    continue  # restarted (or taken by another adopter) since we looked
                except OSError as exc:
                    w.disk.failed(exc, f"adopting node {nodes.shown(node)}")
        return done

    def _dead(self) -> list[str]:
        cfg, me = self._w.cfg.spool, self._w.spool.node
        return [
            node
            for node in nodes.present(cfg)
            if node != me and nodes.has_work(cfg, node) and not nodes.alive(cfg, node)
        ]

    async def adopt(self, node: str) -> Adopted:
        """The operator's ADOPT: ``NodeAlive`` if its lock is held (ours included),
        ``NoSuchNode`` if the spool has no such node."""
        if node == self._w.spool.node:
            raise NodeAlive(node)
        if not nodes.valid(node) or node not in nodes.present(self._w.cfg.spool):
            raise NoSuchNode(node)
        await self._ready.wait()
        async with self._one:
            return await self._adopt(node)

    async def _adopt(self, node: str) -> Adopted:
        w = self._w
        lock = nodes.lock(w.cfg.spool, node)
        try:
            await asyncio.to_thread(lock.acquire)
        except SpoolBusy:
            raise NodeAlive(node) from None
        taking = _Taking()
        try:
            await self._take(node, taking)
        except Exception:
            await self._settle(taking, lock)  # what was moved goes on here, not at a restart
            raise
        except BaseException:
            lock.release()  # cancelled by a stop: what was moved resumes at our next start
            raise
        # the retries first: resuming waits for free slots, which can take long, and a
        # process killed meanwhile must not have kept them to itself
        try:
            done = self.adopted(node, len(taking.moved))
        finally:
            await self._settle(taking, lock)
        return done

    def adopted(self, node: str, envelopes: int) -> Adopted:
        """Step 5, as soon as the dead node's area is taken: schedule the retries in deferred/
        this worker did not know of (the dead node's), and say what was taken over. A
        supervisor's delivery process leaves the retries to the supervisor (child.py)."""
        done = Adopted(node, envelopes, self._recovery.load_deferred(self._scheduler.knows))
        note(done)
        return done

    async def _take(self, node: str, taking: _Taking) -> None:
        """Steps 1 to 4 (the dead node's lock held), noting in ``taking`` what was done."""
        w = self._w
        assert w.journal is not None
        peer = Spool(w.cfg.spool, w.spool.batch, node=node)
        folder = peer.dirs["journal"]
        taking.replayed = replayed = await asyncio.to_thread(journal.replay, folder)
        bsmtp, orig = set(_ids(peer, SUFFIX)), set(_ids(peer, ORIGINAL))
        ids = sorted(bsmtp | orig)
        await asyncio.to_thread(self._recovery.restore_records, replayed, set(ids))
        if ids:
            taking.carried = ids
            w.journal.take(await asyncio.to_thread(journal.carried, folder, ids))
            await w.journal.commit()
            for envelope_id in ids:
                for suffix, present in ((ORIGINAL, orig), (SUFFIX, bsmtp)):
                    if envelope_id in present:
                        await w.spool.take_from(peer, f"{envelope_id}{suffix}")
                taking.moved.append(envelope_id)
                crashpoint.reach("adopting")
        await asyncio.to_thread(journal.drop_segments, folder)

    async def _settle(self, taking: _Taking, lock: SpoolLock) -> None:
        """Let the dead node's lock go and resume what was moved; what was carried but not
        moved (the adoption failed half-way) stays in the dead node's area, whole, and is
        no longer held live in our journal."""
        w = self._w
        assert w.journal is not None
        lock.release()
        for envelope_id in set(taking.carried).difference(taking.moved):
            w.journal.finished(envelope_id)
        await self._resume(taking.moved, taking.replayed)

    async def _resume(self, ids: list[str], replayed: dict[str, Replayed]) -> None:
        """Step 6: as ``Worker._run`` does with what it finds in active/ at start."""
        w = self._w
        assert w._reads is not None
        for envelope_id in set(ids).intersection(w.spool.unconverted()):
            if w._legacy:
                source = replayed.get(envelope_id, Replayed()).source or envelope_id
                await self._pickup.convert(envelope_id, source)
            else:
                name = f"{envelope_id}{ORIGINAL}"
                await w.spool.move_file("active", name, "active", f"{envelope_id}{SUFFIX}")
        here = [i for i in ids if w.spool.envelope("active", i).exists()]
        w._reads.verdicts.update(quarantine.assess(replayed, here))
        for envelope_id in here:  # each may wait for a slot: its record says where it is
            with contextlib.suppress(OSError):  # a full disk: resuming it writes it again
                await self._recovery.relocate(envelope_id, replayed.get(envelope_id, Replayed()))
        for envelope_id in here:
            await w._slots.acquire()
            w._spawn(self._recovery.resume(envelope_id, replayed.get(envelope_id, Replayed())))


def note(done: Adopted) -> None:
    """The adoption's log line (if it took anything over)."""
    if done.envelopes or done.deferred:
        log.warning(
            "adopted node %s: %d envelope(s) in flight resumed here, %d retries scheduled",
            nodes.shown(done.node),
            done.envelopes,
            done.deferred,
        )


@dataclass
class _Taking:
    """How far one adoption got: what the dead node journaled, the envelopes whose lines were
    carried into our journal, and those moved into our active/."""

    replayed: dict[str, Replayed] = field(default_factory=dict)
    carried: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)


def _ids(spool: Spool, suffix: str) -> list[str]:
    """The envelope ids in ``spool``'s active/ with files named ``ID<suffix>``."""
    if suffix == SUFFIX:
        return spool.ids("active")
    return spool.unconverted()
