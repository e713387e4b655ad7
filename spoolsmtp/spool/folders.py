"""The spool: its folders, and every state change of an envelope file, each a rename.

As in Postfix's queue, a folder is a state and only this module moves files between folders.
Each move is followed by an fsync of both directories (coalesced across concurrent moves), so
that a crash leaves every file in exactly one folder that says what to do next.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from spoolsmtp.model import record
from spoolsmtp.model.config import SpoolConfig
from spoolsmtp.model.record import Record
from spoolsmtp.spool import crashpoint, fskind, intake, nodes
from spoolsmtp.spool.durable import fsync_dir, write_file
from spoolsmtp.spool.intake import NotRegular as NotRegular  # noqa: PLC0414 - where it used to live
from spoolsmtp.spool.iobatch import IoBatch
from spoolsmtp.spool.states import Folder, check

FOLDERS = tuple(Folder)
SUFFIX = ".bsmtp"
ORIGINAL = ".orig"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9]{6}-[0-9a-f]{6}$")
_counter = itertools.count()
_random = random.Random(secrets.randbits(64))


def takeable(name: str) -> bool:
    """A file name in incoming/ the worker may take: not a dot-file, not ``*.tmp``, no
    control characters or path separators, at most 255 bytes (any name the file system holds;
    names are bytes, not text: see ``intake``)."""
    return (
        bool(name)
        and not name.startswith(".")
        and not name.endswith(".tmp")
        and not _UNSAFE.search(name)
        and intake.size(name) <= intake.NAME_MAX
    )


def is_id(name: str) -> bool:
    return bool(_ID.match(name))


def new_id() -> str:
    """Sortable, unique ids: date-time, microseconds, a per-process counter and randomness."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    micro = int((now % 1) * 1_000_000)
    tail = (next(_counter) * 0x9E37 + _random.getrandbits(16)) % (1 << 24)
    return f"{stamp}-{micro:06d}-{tail:06x}"


class Spool:
    """The spool folders and the moves between them, as node ``node`` sees them: its own
    active/ and journal/, the shared rest (nodes.py; "" is the default node)."""

    def __init__(self, cfg: SpoolConfig, batch: IoBatch | None = None, node: str = "") -> None:
        self.cfg = cfg
        self.node = node
        # keyed by name: a ``Folder`` is its name, and string call sites keep working
        self.dirs: dict[str, Path] = {name: nodes.folder(cfg, node, name) for name in FOLDERS}
        # the same folders as strings, for the operations done per envelope: joining strings
        # costs a fraction of building a Path, and these run thousands of times a second
        self._dir: dict[str, str] = {name: str(path) for name, path in self.dirs.items()}
        self.batch = batch or IoBatch(inline=fskind.is_local(cfg.path))

    def ensure(self) -> None:
        for path in self.dirs.values():
            path.mkdir(parents=True, exist_ok=True)

    def path(self, folder: str, name: str) -> Path:
        return self.dirs[folder] / name

    def envelope(self, folder: str, envelope_id: str) -> Path:
        return self.dirs[folder] / f"{envelope_id}{SUFFIX}"

    def location(self, folder: str, envelope_id: str) -> str:
        """Where an envelope file is, as its result record and QUERY say it: the folder's
        name (in the spool's layout; ``spool.<folder>`` may put one elsewhere), or for a
        node's own active/ its place, ``nodes/NODE/active``; then the file's name."""
        where = (
            f"{nodes.NODES}/{self.node}/{folder}" if self.node and folder in nodes.OWN else folder
        )
        return f"{where}/{envelope_id}{SUFFIX}"

    def load_record(self, envelope_id: str) -> Record | None:
        """``results/ID.json``; None when there is none, it is not whole, or cannot be read."""
        try:
            return record.load(self.path("results", f"{envelope_id}.json"))
        except OSError:
            return None

    def file(self, folder: str, name: str) -> str:
        """``path`` as a string: for what runs per envelope (building a Path and turning it
        back into a string for a system call costs several times the call itself)."""
        return f"{self._dir[folder]}/{name}"

    # -- moves -----------------------------------------------------------------------------

    def choose_id(self, name: str) -> str | None:
        """The id ``incoming/name`` will be claimed under; None if it is gone or is not a
        regular file (which is then left alone)."""
        try:
            info = os.lstat(self.file("incoming", name))
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        return self._adopt(name) or new_id()

    async def claim(self, name: str, envelope_id: str, suffix: str = SUFFIX) -> bool:
        """Take ``incoming/name`` into ``active/`` under ``envelope_id``, durably, after the
        journal records appended so far; False if it is gone. Raises ``intake.Busy`` while
        some process has it open for writing; the read lease that says it has none is held
        until the file is in active/ (see ``intake``). A move that failed (a full disk, EIO)
        but whose rename was done is a claim: the envelope is in active/ and goes on."""
        try:
            lease = intake.hold_still(self.file("incoming", name))
        except FileNotFoundError:
            return False
        try:
            await self.move_file("incoming", name, "active", f"{envelope_id}{suffix}")
        except OSError as exc:
            # ours after all when it is in active/: the rename was done before the fsync
            # failed, or an NFS client resent a RENAME whose reply was lost and heard ENOENT
            if os.path.lexists(self.file("active", f"{envelope_id}{suffix}")):
                return True
            if isinstance(exc, FileNotFoundError):
                return False  # gone, or (on a shared spool) another node renamed it first
            raise
        finally:
            intake.let_go(lease)
        return True

    def _adopt(self, name: str) -> str | None:
        """A file named ``ID.bsmtp`` by ``spoolsmtp submit`` keeps its id, so the submitter
        can follow ``results/ID.json``; unless that id is already in use."""
        if not name.endswith(SUFFIX) or not is_id(name[: -len(SUFFIX)]):
            return None
        envelope_id = name[: -len(SUFFIX)]
        taken = (self.dirs["results"] / f"{envelope_id}.json").exists() or any(
            (self.dirs[f] / f"{envelope_id}{SUFFIX}").exists()
            for f in ("active", "deferred", "hold", "done")
        )
        return None if taken else envelope_id

    async def convert(self, envelope_id: str, convert: Callable[[Path, Path], None]) -> None:
        """Turn ``active/ID.orig`` into ``active/ID.bsmtp`` durably, then drop the original."""
        check(Folder.ACTIVE, Folder.ACTIVE, f"{envelope_id}{ORIGINAL}")
        orig = self.dirs["active"] / f"{envelope_id}{ORIGINAL}"
        dest = self.envelope("active", envelope_id)

        def op() -> tuple[str]:
            convert(orig, dest)
            return (self._dir["active"],)

        await self.batch.run(op)

        def drop() -> tuple[str]:
            orig.unlink()
            return (self._dir["active"],)

        await self.batch.run(drop)

    def unconverted(self) -> list[str]:
        return sorted(
            p.name[: -len(ORIGINAL)]
            for p in self.dirs["active"].glob(f"*{ORIGINAL}")
            if is_id(p.name[: -len(ORIGINAL)])
        )

    async def move(
        self, envelope_id: str, source: str, target: str, name: str | None = None
    ) -> Path:
        """Move an envelope between state folders (``name`` overrides its file name)."""
        new_name = name or f"{envelope_id}{SUFFIX}"
        await self.move_file(source, f"{envelope_id}{SUFFIX}", target, new_name)
        return self.dirs[target] / new_name

    async def conclude(
        self, envelope_id: str, record: bytes, target: str | None = None, *, durable: bool = False
    ) -> None:
        """Replace ``results/ID.json`` with ``record``, then move the envelope from active/ to
        ``target`` (if given): one I/O operation, run after the journal records appended so
        far are committed (the record among them).

        The record file is atomic but not fsynced, and the move is not made durable unless
        ``durable``: the journal redoes both after a crash (an envelope found back in active/
        is resumed from it) until the next checkpoint syncs them.
        """
        name = f"{envelope_id}{SUFFIX}"
        results = self.file("results", f"{envelope_id}.json")
        if target is not None:
            check(Folder.ACTIVE, target, name)

        def op() -> tuple[str, ...]:
            write_file(results, record, fsync=False, sync_dir=False)
            if target is None:
                return ()
            crashpoint.reach("before_final_rename")
            os.rename(self.file("active", name), self.file(target, name))
            return (self._dir["active"], self._dir[target]) if durable else ()

        await self.batch.run(op, quick=True)

    def unsynced(self) -> list[Path]:
        """The folders ``conclude`` writes without syncing, for the checkpoint to sync (not
        incoming/, whose writers are the batch jobs, nor folders written file by file)."""
        return [self.dirs[name] for name in ("active", "deferred", "done", "results")]

    async def move_file(self, source: str, name: str, target: str, new_name: str) -> None:
        """Rename one file between (or within) folders, durably: the one move every other
        goes through, checked against the legal transitions (``folders.check``)."""
        check(source, target, name)
        src, dest = self.file(source, name), self.file(target, new_name)
        dirs = (self._dir[source], self._dir[target])

        def op() -> tuple[str, ...]:
            os.rename(src, dest)
            return dirs

        await self.batch.run(op, quick=True)

    async def take_from(self, peer: Spool, name: str) -> None:
        """Adoption: rename ``name`` from a dead node's active/ (``peer``'s) into ours,
        durably, after the journal records appended so far (the state carried with it)."""
        check(Folder.ACTIVE, Folder.ACTIVE, name)
        src, dest = f"{peer._dir['active']}/{name}", self.file("active", name)
        dirs = (peer._dir["active"], self._dir["active"])

        def op() -> tuple[str, ...]:
            if os.path.lexists(dest):  # only we write our active/: no race with this check
                raise FileExistsError(errno.EEXIST, "already in our active/", dest)
            os.rename(src, dest)
            return dirs

        await self.batch.run(op)

    def restore_record(self, envelope_id: str, record: bytes) -> None:
        """Put back ``results/ID.json`` from the journal (at start, blocking; the folder is
        synced by ``sync_results``)."""
        write_file(self.file("results", f"{envelope_id}.json"), record, sync_dir=False)

    def sync_results(self) -> None:
        fsync_dir(self._dir["results"])

    # -- files -----------------------------------------------------------------------------

    async def open_own(self, envelope_id: str, whole: int = 0) -> bytes | BinaryIO:
        """``active/ID.bsmtp`` made a file only the worker can change, then opened (not
        following links; a regular file only). A file someone else owns, or that has another
        link, is first copied (``intake.copy_own``, in a thread: a large copy must not hold up
        the loop) and the copy opened; the worker's own file is read through the descriptor
        that checked it. A file of at most ``whole`` bytes is read at once and returned as
        bytes (most envelopes are a few KB); a larger one is returned open, for streaming."""
        path = self.file("active", f"{envelope_id}{SUFFIX}")
        fd, info = intake.open_regular(path)
        if intake.foreign(info):
            await asyncio.to_thread(intake.copy_own, fd, info, path)
            fd, info = intake.open_regular(path)
        try:
            if info.st_size <= whole:
                return _read_all(fd, info)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")

    async def write(self, folder: str, name: str, data: bytes, *, private: bool = False) -> Path:
        """Durably write a file into a folder (temp, fsync, rename, coalesced dir fsync).
        ``private``: written 0600 in active/ (which only the worker may write) and renamed
        into ``folder``, for folders others may write (incoming/); when they are on different
        file systems, in ``folder`` itself under its unpredictable O_EXCL temp name."""
        path = self.dirs[folder] / name
        via = self._dir["active"] if private and self._same_fs(folder, "active") else None
        mode = 0o600 if private else 0o640
        dirs = (self._dir[folder],) if via is None else (self._dir[folder], via)

        def op() -> tuple[str, ...]:
            write_file(path, data, sync_dir=False, mode=mode, temp_dir=via)
            return dirs

        await self.batch.run(op)
        return path

    def _same_fs(self, one: str, other: str) -> bool:
        return os.stat(self._dir[one]).st_dev == os.stat(self._dir[other]).st_dev

    def write_quick(self, folder: str, name: str, data: bytes) -> Path:
        """Atomically (not durably) replace a small file that can be rebuilt after a crash; at
        once, in the caller's thread."""
        path = self.dirs[folder] / name
        write_file(path, data, fsync=False, sync_dir=False)
        return path

    def ids(self, folder: str) -> list[str]:
        out = []
        for entry in os.scandir(self.dirs[folder]):
            if entry.name.endswith(SUFFIX) and is_id(entry.name[: -len(SUFFIX)]):
                out.append(entry.name[: -len(SUFFIX)])
        return sorted(out)


def _read_all(fd: int, info: os.stat_result) -> bytes:
    """The whole file (``info`` is what fstat said; whatever it holds is read) and close it;
    ``intake.Changed`` if it changed meanwhile."""
    try:
        parts = [os.read(fd, info.st_size + 1)]
        while parts[-1]:
            parts.append(os.read(fd, 1 << 16))
        intake.check_unchanged(fd, info)
        return b"".join(parts)
    finally:
        os.close(fd)
