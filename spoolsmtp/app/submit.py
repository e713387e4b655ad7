"""``spoolsmtp submit``: wrap a message in a Batch SMTP envelope and drop it into incoming/.

The SENDFILE/NOTE of the VM world. It only writes the spool (temp name, fsync, rename, fsync of
the folder, or syncfs where the caller may write it but not read it), so it works whether or not
the worker runs; it never writes through a symlink at incoming/. The envelope file is named
``ID.bsmtp``; the worker keeps that id, so ``--wait`` follows ``results/ID.json``.
"""

from __future__ import annotations

import errno
import getpass
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from spoolsmtp.app.waitresult import outcome, wait
from spoolsmtp.bsmtp import writer
from spoolsmtp.bsmtp.address import parse_path
from spoolsmtp.bsmtp.compose import (
    address_fault,
    check_phrase,
    complete_headers,
    qualify,
    recipients_from_headers,
)
from spoolsmtp.control import client as ctl
from spoolsmtp.model import exitcodes
from spoolsmtp.model.config import Config
from spoolsmtp.model.envelope import MailParams, Notify, Recipient, Ret
from spoolsmtp.model.errors import SpoolsmtpError
from spoolsmtp.spool.durable import NotDurable, open_folder, write_new_at
from spoolsmtp.spool.folders import SUFFIX, new_id

__all__ = ["Submission", "SubmitError", "build", "outcome", "recipients_from_headers", "submit"]
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


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


def default_sender(cfg: Config) -> str:
    if cfg.submit.sender:
        return cfg.submit.sender
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "root" if os.geteuid() == 0 else str(os.geteuid())
    return f"{user}@{cfg.helo_name}"


def _check_address(address: str, cfg: Config, *, sender: bool, flag: str | None = None) -> None:
    if sender and address == "":
        return
    what = f"{flag}: " if flag else ""
    role = "sender" if sender else "recipient"
    fault = address_fault(address)
    if fault:
        raise SubmitError(exitcodes.USAGE, f"{what}{role} address {address!r} {fault}")
    utf8 = not address.isascii()
    _, bad = parse_path(f"<{address}>", cfg.limits, sender=sender, utf8=utf8)
    if bad is not None:
        raise SubmitError(exitcodes.USAGE, f"{what}bad {role} address {address!r}: {bad.text}")


def qualify_domain(cfg: Config) -> str:
    return cfg.submit.qualify_domain or cfg.helo_name


def build(cfg: Config, sub: Submission, message: bytes) -> tuple[str, bytes]:
    """The envelope id and the envelope file's bytes."""
    envelope_id = new_id()
    domain = qualify_domain(cfg)
    if sub.full_name is not None:
        fault = check_phrase(sub.full_name)
        if fault:
            raise SubmitError(exitcodes.USAGE, f"-F: the full name {fault}")
    recipients = [qualify(r, domain) for r in sub.recipients]
    from_headers: list[str] = []
    if sub.from_headers:
        found, message = recipients_from_headers(message)
        from_headers = [q for q in (qualify(r, domain) for r in found) if q not in recipients]
        recipients += from_headers
    if not recipients:
        raise SubmitError(exitcodes.USAGE, "no recipients (give some, or -t to read To/Cc/Bcc)")
    sender = qualify(default_sender(cfg) if sub.sender is None else sub.sender, domain)
    _check_address(sender, cfg, sender=True, flag=None if sub.sender is None else "-f")
    for rcpt in recipients:
        _check_address(rcpt, cfg, sender=False, flag="-t" if rcpt in from_headers else None)
    message = complete_headers(message, sender, sub.full_name, cfg.helo_name, envelope_id, domain)
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


def drop(incoming: Path, envelope_id: str, data: bytes) -> str | None:
    """Write ``incoming/ID.bsmtp`` atomically and durably; no partial file is ever left. The
    folder is opened once without following a link and without needing to read it (a 1733
    drop box); the file is made relative to that descriptor. SubmitError: nothing was queued.
    A string: the file IS queued, but this is why it may not survive a crash."""
    try:
        folder = open_folder(incoming)
    except OSError as exc:
        raise _folder_error(exc, incoming) from exc
    try:
        _check_folder(os.fstat(folder), incoming)
        write_new_at(folder, f"{envelope_id}{SUFFIX}", data)
    except NotDurable as exc:
        return f"making it durable failed ({exc}); it may be lost if the machine crashes now"
    except OSError as exc:
        raise _spool_error(exc, incoming) from exc
    finally:
        os.close(folder)
    return None


def _folder_error(exc: OSError, incoming: Path) -> SubmitError:
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        what = "a symbolic link" if incoming.is_symlink() else "not a folder"
        return SubmitError(
            exitcodes.CANTCREAT, f"spool {incoming} is {what}; not writing through it"
        )
    return _spool_error(exc, incoming)


def _check_folder(info: os.stat_result, incoming: Path) -> None:
    """Root writes only into a folder where no one else can remove or swap its file: one
    that others may write must be sticky (as /tmp, as the worker's own start-up check)."""
    mode = stat.S_IMODE(info.st_mode)
    if os.geteuid() == 0 and mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise SubmitError(
            exitcodes.CANTCREAT,
            f"spool {incoming} is writable by group or others (mode {mode:04o}) but not sticky;"
            " root does not write there (make it 1733)",
        )


def _spool_error(exc: OSError, incoming: Path) -> SubmitError:
    if exc.errno in _FULL:
        return SubmitError(
            exitcodes.TEMPFAIL, f"spool {incoming} is full ({exc.strerror}); try again later"
        )
    return SubmitError(
        exitcodes.CANTCREAT, f"cannot write into spool {incoming}: {exc.strerror or exc}"
    )


def submit(
    cfg: Config,
    sub: Submission,
    stream: BinaryIO,
    *,
    wait_seconds: float | None = None,
    as_json: bool = False,
    quiet: bool = False,
    prog: str = "spoolsmtp submit",
) -> int:
    """Read, wrap, drop; print the id; optionally wait for the outcome."""
    try:
        message = read_message(stream, dot_ends=sub.dot_ends)
        envelope_id, data = build(cfg, sub, message)
        unsure = drop(cfg.spool.folder("incoming"), envelope_id, data)
    except SubmitError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    if unsure:  # queued all the same: a failure here would make a retrying job send it twice
        print(f"{prog}: {envelope_id} is queued, but {unsure}", file=sys.stderr)
    if wait_seconds is None:
        if not quiet:
            print(envelope_id)
        return exitcodes.OK
    trusted = ctl.trusted_uids(worker_user=cfg.user, spool_folder=cfg.spool.folder("active"))
    waited = wait(
        cfg.spool.folder("results"), cfg.control_socket, envelope_id, wait_seconds, trusted=trusted
    )
    record = waited.record
    if as_json:
        print(json.dumps(record if record is not None else {"id": envelope_id, "state": "queued"}))
    else:
        print(envelope_id)
        for tx in (record or {}).get("transactions") or []:
            for r in tx.get("recipients") or []:
                reply = r.get("reply") or {}
                said = f"{reply.get('code', '')} {reply.get('text', '')}".strip()
                print(f"{r.get('address')}: {r.get('status')} {said}".rstrip())
        for line in (record or {}).get("batch_errors") or []:
            print(f"refused: {line}")
        if (record or {}).get("reason"):
            print(f"rejected: {(record or {})['reason']}")
    if waited.problem:
        print(
            f"{prog}: {envelope_id} is queued, but cannot learn the outcome: {waited.problem}",
            file=sys.stderr,
        )
    return waited.code
