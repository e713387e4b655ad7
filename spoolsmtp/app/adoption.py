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
5. resumes the envelopes exactly as its own after a crash (``Recovery.resume``): accepted
   recipients are not sent again, the section 6.1 window is counted as possible duplicates,
   reports are not repeated, and a crash while reading one is counted as such;
6. schedules the retries in deferred/ it did not know of (the dead node's).

A crash anywhere leaves something the next adoption or restart resumes: before 3, the dead
node's area is whole (lines carried twice are the same facts); between renames, the moved
envelopes are in our active/ with their state in our journal, the rest still in the dead
node's area with its journal; before 4, the segments are carried again, harmlessly.

Adoption runs at start, every ``spool.rescan_interval`` and on the operator's ``ADOPT node``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from spoolsmtp.spool import crashpoint, journal, nodes, quarantine
from spoolsmtp.spool.folders import ORIGINAL, SUFFIX, Spool
from spoolsmtp.spool.journal import Replayed
from spoolsmtp.spool.lock import SpoolBusy
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
        try:
            ids, replayed = await self._take(node)
        finally:
            lock.release()
        await self._resume(ids, replayed)
        deferred = self._recovery.load_deferred(self._scheduler.knows)
        if ids or deferred:
            log.warning(
                "adopted node %s: %d envelope(s) in flight resumed here, %d retries scheduled",
                nodes.shown(node),
                len(ids),
                deferred,
            )
        return Adopted(node, len(ids), deferred)

    async def _take(self, node: str) -> tuple[list[str], dict[str, Replayed]]:
        """Steps 1 to 4 (the dead node's lock held): the ids now in our active/."""
        w = self._w
        assert w.journal is not None
        peer = Spool(w.cfg.spool, w.spool.batch, node=node)
        folder = peer.dirs["journal"]
        replayed = await asyncio.to_thread(journal.replay, folder)
        bsmtp, orig = set(_ids(peer, SUFFIX)), set(_ids(peer, ORIGINAL))
        ids = sorted(bsmtp | orig)
        await asyncio.to_thread(self._recovery.restore_records, replayed, set(ids))
        if ids:
            w.journal.take(await asyncio.to_thread(journal.carried, folder, ids))
            await w.journal.commit()
            for envelope_id in ids:
                for suffix, present in ((ORIGINAL, orig), (SUFFIX, bsmtp)):
                    if envelope_id in present:
                        await w.spool.take_from(peer, f"{envelope_id}{suffix}")
                crashpoint.reach("adopting")
        await asyncio.to_thread(journal.drop_segments, folder)
        return ids, replayed

    async def _resume(self, ids: list[str], replayed: dict[str, Replayed]) -> None:
        """Step 5: as ``Worker._run`` does with what it finds in active/ at start."""
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
        for envelope_id in here:
            await w._slots.acquire()
            w._spawn(self._recovery.resume(envelope_id, replayed.get(envelope_id, Replayed())))


def _ids(spool: Spool, suffix: str) -> list[str]:
    """The envelope ids in ``spool``'s active/ with files named ``ID<suffix>``."""
    if suffix == SUFFIX:
        return spool.ids("active")
    return spool.unconverted()
