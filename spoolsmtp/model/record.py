"""The result record ``results/ID.json``: one envelope's state and every recipient's fate.

A batch job polls this file; the worker rewrites it (atomically and durably) after every
attempt. It is also the persisted state of a deferred envelope: attempts, next attempt, which
reports were sent. Fields follow SPEC.md "The result record"; recipients not yet tried have
status ``queued``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any

from spoolsmtp.model.reply import Reply


class State(Enum):
    """Where the envelope is (SPEC.md), as the record reports it."""

    ACTIVE = "active"
    DEFERRED = "deferred"
    DONE = "done"
    REJECTED = "rejected"
    HELD = "held"


class RcptStatus(StrEnum):
    """A recipient's status in the record (a ``str``: the JSON holds the same words)."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEFERRED = "deferred"


QUEUED = RcptStatus.QUEUED
FINAL = (RcptStatus.DELIVERED, RcptStatus.FAILED)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def reply_dict(reply: Reply) -> dict[str, Any]:
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


def reply_from(data: dict[str, Any]) -> Reply:
    return Reply(int(data["code"]), data.get("enhanced"), tuple(str(data["text"]).split("\n")))


@dataclass
class RcptRecord:
    """One recipient's fate so far. ``decided_locally``: the reply is spoolsmtp's own decision
    (no server said it; ``host`` is then None). ``dsn_relayed``: the server that accepted it
    offered DSN and got its NOTIFY, so that server, not spoolsmtp, reports its success."""

    address: str
    status: RcptStatus = QUEUED
    reply: Reply | None = None
    host: str | None = None
    attempts: int = 0
    first_attempt_at: str | None = None
    last_attempt_at: str | None = None
    next_attempt_at: str | None = None
    possible_duplicate: bool = False
    reported: bool = False
    decided_locally: bool = False
    dsn_relayed: bool = False

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _RCPT_FIELDS}
        if self.reply is not None:
            data["reply"] = reply_dict(self.reply)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RcptRecord:
        unknown = set(data) - set(_RCPT_FIELDS)
        if unknown:
            raise TypeError(f"no recipient field {sorted(unknown)[0]!r}")
        rcpt = cls(data["address"])
        rcpt.update(data)
        return rcpt

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set fields from their JSON form (a journaled result, a record read back)."""
        for key, value in changes.items():
            if key == "status":
                setattr(self, key, RcptStatus(value))
            elif key == "reply" and value is not None:
                setattr(self, key, reply_from(value))
            else:
                setattr(self, key, value)


_RCPT_FIELDS = tuple(f.name for f in fields(RcptRecord))


@dataclass
class TxRecord:
    number: int
    mail_from: str
    recipients: list[RcptRecord] = field(default_factory=list)


@dataclass
class Record:
    """The whole result record; ``to_json`` / ``from_json`` round-trip it."""

    id: str
    source: str
    state: State
    received_at: str
    updated_at: str
    location: str = ""
    transactions: list[TxRecord] = field(default_factory=list)
    batch_errors: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    reason: str | None = None
    crashes: int = 0
    warned: bool = False
    owner_uid: int | None = None  # the envelope file's owner as submitted (None: older records)
    owner_gid: int | None = None
    _index: dict[tuple[int, str], RcptRecord] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def recipients(self) -> list[tuple[TxRecord, RcptRecord]]:
        return [(t, r) for t in self.transactions for r in t.recipients]

    def next_due(self, default: float) -> float:
        """When the next retry is due (epoch seconds): the earliest ``next_attempt_at`` of a
        recipient not yet final, else ``default``."""
        times = [
            parse_iso(r.next_attempt_at).timestamp()
            for _, r in self.recipients()
            if not r.final and r.next_attempt_at
        ]
        return min(times, default=default)

    def find(self, tx: int, address: str) -> RcptRecord:
        """The record of one recipient, by an index: the worker asks once per recipient, and a
        linear search made an envelope of 40,000 transactions take minutes of CPU."""
        found = self._index.get((tx, address))
        if found is None:
            self._index = {
                (t.number, r.address): r for t in self.transactions for r in t.recipients
            }
            found = self._index.get((tx, address))
            if found is None:
                raise KeyError((tx, address))
        return found

    def to_dict(self) -> dict[str, Any]:
        """The record as its JSON document (what ``results/ID.json`` and QUERY hold)."""
        data = {name: getattr(self, name) for name in _RECORD_FIELDS}
        data["state"] = self.state.value
        data["transactions"] = [
            {
                "number": t.number,
                "mail_from": t.mail_from,
                "recipients": [r.to_dict() for r in t.recipients],
            }
            for t in self.transactions
        ]
        return data

    def to_json(self) -> bytes:
        # a source name that is not UTF-8 holds lone surrogates (os.fsdecode); they are written
        # as JSON's \\uDCxx escapes, which json.loads and os.fsencode turn back into its bytes
        return _ENCODE(self.to_dict()).encode("utf-8", "backslashreplace") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Record:
        return cls.from_dict(json.loads(raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        data = dict(data)
        data["state"] = State(data["state"])
        data["transactions"] = [
            TxRecord(
                t["number"], t["mail_from"], [RcptRecord.from_dict(r) for r in t["recipients"]]
            )
            for t in data["transactions"]
        ]
        return cls(**data)


def load(path: str | os.PathLike[str]) -> Record | None:
    """The result record in the file at ``path``: the one reader of result records. None if
    there is none (yet), or it is not a whole record (being replaced; or not one at all); any
    other ``OSError`` (``PermissionError``: the worker's file) is raised."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        return Record.from_json(raw)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# built once: json.dumps with any option builds a new encoder per call, and fields() walks the
# class each time; a record is encoded once or twice per envelope
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode
_RECORD_FIELDS = tuple(f.name for f in fields(Record) if f.init)
