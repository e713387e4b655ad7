"""``spoolsmtp submit``: wrap a message in a Batch SMTP envelope and drop it into incoming/.

The SENDFILE/NOTE of the VM world. It only writes the spool (temp name, fsync, rename, fsync of
the folder), so it works whether or not the worker runs. The envelope file is named
``ID.bsmtp``; the worker keeps that id, so ``--wait`` follows ``results/ID.json``.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import Any, BinaryIO

from spoolsmtp import exitcodes, writer
from spoolsmtp.address import parse_path
from spoolsmtp.config import Config
from spoolsmtp.durable import write_file
from spoolsmtp.envelope import MailParams, Notify, Recipient, Ret
from spoolsmtp.errors import SpoolsmtpError
from spoolsmtp.spool import SUFFIX, new_id

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
POLL = 0.1


class SubmitError(SpoolsmtpError):
    """Submission failed; ``code`` is the exit status (sysexits)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class Submission:
    """What to send: built from the command line (submit or sendmail) and the message."""

    sender: str | None
    recipients: tuple[str, ...]
    from_headers: bool = False
    dot_ends: bool = True
    full_name: str | None = None
    verbose: bool = False
    notify: frozenset[Notify] | None = None
    ret: Ret | None = None
    envid: str | None = None


def read_message(stream: BinaryIO, *, dot_ends: bool) -> bytes:
    """The message from standard input; without -i a line holding only '.' ends it."""
    if not dot_ends:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def _split(message: bytes) -> tuple[bytes, bytes, bytes]:
    """Header block, the blank line, body."""
    if message.startswith((b"\n", b"\r\n")):
        nl = b"\r\n" if message.startswith(b"\r\n") else b"\n"
        return b"", nl, message[len(nl) :]
    m = _HEADER_END.search(message)
    if not m:
        return message, b"", b""
    return message[: m.start() + 1], message[m.start() + 1 : m.end()], message[m.end() :]


def _fields(head: bytes) -> list[tuple[str, bytes]]:
    """Header fields with their continuation lines, in order: (lower-case name, raw bytes)."""
    out: list[tuple[str, bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            name, raw = out[-1]
            out[-1] = (name, raw + line)
        else:
            out.append((line.split(b":", 1)[0].strip().lower().decode("ascii", "replace"), line))
    return out


def recipients_from_headers(message: bytes) -> tuple[list[str], bytes]:
    """-t: addresses of To, Cc and Bcc; the message returned without its Bcc fields."""
    head, blank, body = _split(message)
    fields = _fields(head)
    values = []
    for name, raw in fields:
        if name in ("to", "cc", "bcc"):
            value = raw.split(b":", 1)[1].decode("utf-8", "replace")
            values.append(" ".join(value.split()))
    addresses = [addr for _, addr in getaddresses(values) if addr]
    kept = b"".join(raw for name, raw in fields if name != "bcc")
    return list(dict.fromkeys(addresses)), kept + blank + body


def complete_headers(
    message: bytes, sender: str, full_name: str | None, hostname: str, envelope_id: str
) -> bytes:
    """Add Date, Message-ID and From when missing, as a sendmail would."""
    head, blank, body = _split(message)
    names = {name for name, _ in _fields(head)}
    nl = b"\r\n" if b"\r\n" in message[:1000] else b"\n"
    added: list[str] = []
    if "from" not in names and sender:
        added.append(f"From: {full_name} <{sender}>" if full_name else f"From: <{sender}>")
    if "date" not in names:
        added.append(f"Date: {format_datetime(datetime.now(UTC))}")
    if "message-id" not in names:
        added.append(f"Message-ID: <{envelope_id}@{hostname}>")
    extra = b"".join(a.encode("utf-8") + nl for a in added)
    if not head and not blank:
        return extra + nl + body
    return extra + head + (blank or nl) + body


def default_sender(cfg: Config) -> str:
    if cfg.submit.sender:
        return cfg.submit.sender
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "root" if os.geteuid() == 0 else str(os.geteuid())
    return f"{user}@{cfg.helo_name}"


def _check_address(address: str, cfg: Config, *, sender: bool) -> None:
    utf8 = not address.isascii()
    if sender and address == "":
        return
    _, fault = parse_path(f"<{address}>", cfg.limits, sender=sender, utf8=utf8)
    if fault is not None:
        role = "sender" if sender else "recipient"
        raise SubmitError(exitcodes.USAGE, f"bad {role} address {address!r}: {fault.text}")


def build(cfg: Config, sub: Submission, message: bytes) -> tuple[str, bytes]:
    """The envelope id and the envelope file's bytes."""
    envelope_id = new_id()
    recipients = list(sub.recipients)
    if sub.from_headers:
        found, message = recipients_from_headers(message)
        recipients += [r for r in found if r not in recipients]
    if not recipients:
        raise SubmitError(exitcodes.USAGE, "no recipients (give some, or -t to read To/Cc/Bcc)")
    sender = default_sender(cfg) if sub.sender is None else sub.sender
    _check_address(sender, cfg, sender=True)
    for rcpt in recipients:
        _check_address(rcpt, cfg, sender=False)
    message = complete_headers(message, sender, sub.full_name, cfg.helo_name, envelope_id)
    utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
    params = MailParams(smtputf8=utf8, ret=sub.ret, envid=sub.envid)
    rcpts = tuple(Recipient(r, sub.notify) for r in recipients)
    try:
        data = writer.render(
            [writer.Draft(sender, rcpts, message, params)], cfg.helo_name, verbose=sub.verbose
        )
    except writer.MessageError as exc:
        raise SubmitError(exitcodes.DATAERR, f"the message cannot be sent: {exc}") from exc
    return envelope_id, data


def drop(incoming: Path, envelope_id: str, data: bytes) -> Path:
    """Write ``incoming/ID.bsmtp`` atomically and durably; no partial file is ever left."""
    final = incoming / f"{envelope_id}{SUFFIX}"
    try:
        write_file(final, data)
    except OSError as exc:
        raise _spool_error(exc, incoming) from exc
    return final


def _spool_error(exc: OSError, incoming: Path) -> SubmitError:
    if exc.errno in _FULL:
        return SubmitError(
            exitcodes.TEMPFAIL, f"spool {incoming} is full ({exc.strerror}); try again later"
        )
    return SubmitError(
        exitcodes.CANTCREAT, f"cannot write into spool {incoming}: {exc.strerror or exc}"
    )


def outcome(record: dict[str, Any]) -> int | None:
    """The exit code a final record means (None while it is not final)."""
    if record.get("state") == "rejected":
        return exitcodes.DATAERR
    if record.get("state") != "done":
        return None
    statuses = [r["status"] for t in record["transactions"] for r in t["recipients"]]
    return exitcodes.FAILED if "failed" in statuses else exitcodes.OK


def wait(results: Path, envelope_id: str, seconds: float) -> tuple[int, dict[str, Any] | None]:
    """Follow ``results/ID.json`` until final or until ``seconds`` pass (0: no limit)."""
    path = results / f"{envelope_id}.json"
    deadline = time.monotonic() + seconds if seconds > 0 else None
    record: dict[str, Any] | None = None
    while True:
        with contextlib.suppress(FileNotFoundError, ValueError):
            record = json.loads(path.read_bytes())
        if record is not None:
            code = outcome(record)
            if code is not None:
                return code, record
        if deadline is not None and time.monotonic() >= deadline:
            return exitcodes.TEMPFAIL, record
        time.sleep(POLL)


def submit(
    cfg: Config,
    sub: Submission,
    stream: BinaryIO,
    *,
    wait_seconds: float | None = None,
    as_json: bool = False,
    quiet: bool = False,
) -> int:
    """Read, wrap, drop; print the id; optionally wait for the outcome."""
    try:
        message = read_message(stream, dot_ends=sub.dot_ends)
        envelope_id, data = build(cfg, sub, message)
        drop(cfg.spool.folder("incoming"), envelope_id, data)
    except SubmitError as exc:
        print(f"spoolsmtp submit: {exc}", file=sys.stderr)
        return exc.code
    if wait_seconds is None:
        if not quiet:
            print(envelope_id)
        return exitcodes.OK
    code, record = wait(cfg.spool.folder("results"), envelope_id, wait_seconds)
    if as_json:
        print(json.dumps(record if record is not None else {"id": envelope_id, "state": "queued"}))
    else:
        print(envelope_id)
        for tx in (record or {}).get("transactions", []):
            for r in tx["recipients"]:
                reply = r.get("reply") or {}
                said = f"{reply.get('code', '')} {reply.get('text', '')}".strip()
                print(f"{r['address']}: {r['status']} {said}".rstrip())
    return code
