"""The queue as ``spoolsmtp queue`` (mailq) shows it, read from the spool's files alone: every
envelope waiting in incoming/, active/, deferred/ and hold/, with its size, arrival, senders and
each recipient's last reply (from ``results/ID.json``; from the envelope itself when there is no
record yet).

Read-only and unlocked: it works with the worker stopped or running, for anyone who may read
the folders. A running worker moves files while they are read: a file gone between the listing
and its reading has moved on and is left out (it is listed where it went, or is finished), and a
record being replaced is read as no record (``record.load``). Nothing here writes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spoolsmtp.model.config import Config
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.model.record import RcptStatus, Record, parse_iso
from spoolsmtp.model.record import load as load_record
from spoolsmtp.model.reply import Reply
from spoolsmtp.spool import envfile, nodes
from spoolsmtp.spool.folders import SUFFIX, is_id, takeable

# the folders an envelope waits in, in the order of its life (mailq lists these)
STATES = ("incoming", "active", "deferred", "hold")
# an envelope without a record is read for its senders and recipients up to this size
PARSE_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class QueuedRcpt:
    """One recipient of a queued envelope and how it fared so far."""

    address: str
    sender: str
    transaction: int
    status: str
    reply: Reply | None = None
    attempts: int = 0
    next_attempt_at: str | None = None

    @property
    def final(self) -> bool:
        return self.status in (RcptStatus.DELIVERED, RcptStatus.FAILED)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class Queued:
    """One envelope file waiting in ``state`` (its folder). ``id``: the envelope id, or for a
    file in incoming/ not named by one, the file name. ``source``: the name it was submitted
    under, when known. ``recipients`` is empty when nothing could be read of them."""

    state: str
    id: str
    size: int
    arrival: float
    source: str | None
    recipients: tuple[QueuedRcpt, ...]
    senders: tuple[str, ...]

    @property
    def sender(self) -> str | None:
        return self.senders[0] if self.senders else None

    @property
    def pending(self) -> tuple[QueuedRcpt, ...]:
        return tuple(r for r in self.recipients if not r.final)


def scan(
    cfg: Config, states: Iterable[str] = STATES, denied: list[Path] | None = None
) -> Iterator[Queued]:
    """The envelopes waiting in ``states``, each folder in name order (ids sort by arrival).
    A folder we may not read is added to ``denied`` (if given) and left out."""
    for state in states:
        for folder in _folders(cfg, state):
            try:
                with os.scandir(folder) as entries:
                    names = sorted(e.name for e in entries)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except PermissionError:
                if denied is not None:
                    denied.append(folder)
                continue
            for name in names:
                found = _one(cfg, state, folder, name)
                if found is not None:
                    yield found


def _folders(cfg: Config, state: str) -> list[Path]:
    """The folders of a state: mail in flight is in every node's own active/ (several hosts,
    a supervisor's delivery processes), the rest is shared."""
    if state != "active":
        return [cfg.spool.folder(state)]
    return [nodes.folder(cfg.spool, node, "active") for node in nodes.present(cfg.spool)]


def _one(cfg: Config, state: str, folder: Path, name: str) -> Queued | None:
    if state == "incoming":
        if not takeable(name):
            return None
        envelope_id = name[: -len(SUFFIX)] if _is_envelope_name(name) else name
    else:
        if not _is_envelope_name(name):
            return None
        envelope_id = name[: -len(SUFFIX)]
    path = folder / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None  # moved on while we looked
    if not stat.S_ISREG(info.st_mode):
        return None
    rec = _record(cfg, envelope_id) if state != "incoming" else None
    if rec is not None:
        rcpts = tuple(
            QueuedRcpt(
                r.address,
                t.mail_from,
                t.number,
                str(r.status),
                r.reply,
                r.attempts,
                r.next_attempt_at,
            )
            for t, r in rec.recipients()
        )
        senders = tuple(dict.fromkeys(t.mail_from for t in rec.transactions))
        arrival = parse_iso(rec.received_at).timestamp()
        return Queued(state, envelope_id, info.st_size, arrival, rec.source, rcpts, senders)
    read = _read(cfg, path, info, name)
    if read is None:
        return None
    rcpts, senders = read
    source = name if state == "incoming" else None
    return Queued(state, envelope_id, info.st_size, info.st_mtime, source, rcpts, senders)


def _is_envelope_name(name: str) -> bool:
    return name.endswith(SUFFIX) and is_id(name[: -len(SUFFIX)])


def _record(cfg: Config, envelope_id: str) -> Record | None:
    try:
        return load_record(cfg.spool.folder("results") / f"{envelope_id}.json")
    except OSError:  # not ours to read: the envelope is listed without it
        return None


def _read(
    cfg: Config, path: Path, info: os.stat_result, name: str
) -> tuple[tuple[QueuedRcpt, ...], tuple[str, ...]] | None:
    """Senders and recipients from the envelope file itself (all ``queued``); empty when it
    is too large, not readable by us, or not an envelope (yet); None if it is gone."""
    if info.st_size > PARSE_LIMIT:
        return (), ()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return (), ()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return (), ()
        data = os.read(fd, PARSE_LIMIT + 1)
    except OSError:
        return (), ()
    finally:
        os.close(fd)
    try:
        env = envfile.read_bytes(data, name, cfg.limits, cfg.helo_name, PARSE_LIMIT)
    except (EnvelopeFault, UnicodeError, ValueError):
        return (), ()
    rcpts = tuple(
        QueuedRcpt(r.address, tx.mail_from, tx.number, str(RcptStatus.QUEUED))
        for tx in env.transactions
        for r in tx.recipients
    )
    return rcpts, tuple(dict.fromkeys(tx.mail_from for tx in env.transactions))
