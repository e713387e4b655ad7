"""``submit --wait``: follow one envelope to its outcome and say what it means as an exit code.

The outcome comes from ``results/ID.json`` when the submitting user can read it, else from the
worker's control socket (``JSON QUERY ID``, open to anyone), since records may belong to the
worker's user and be unreadable to others; the socket is believed only when the process behind
it runs as root, as us or as the worker's user (SO_PEERCRED), as ``spoolsmtp ctl`` requires.
Nothing here ever claims delivery for a message that was not delivered, and nothing raises: a
wait that cannot learn the outcome says so (exit 75; the mail is queued, and a job that retried
on another code would send it twice).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoolsmtp.model import exitcodes
from spoolsmtp.model.record import load as load_record

POLL = 0.1
SOCKET_POLL = 0.5  # asking the worker costs it a record read: not ten times a second
_QUERY_TIMEOUT = 10.0
# reasons a connect can never succeed for this user; anything else (ENOENT, ECONNREFUSED: no
# worker yet) may pass when the worker starts
_NEVER = {errno.EACCES, errno.EPERM}


def outcome(record: dict[str, Any]) -> int | None:
    """The exit code a final record means (None while it is not final).

    0 only when every recipient of every transaction was delivered and no command was refused.
    65 when nothing of the message could be sent: the file was rejected as not an envelope, or
    no transaction was accepted (the message itself was refused). 67 when some recipient failed
    or was refused, including a quarantined envelope (rejected, its recipients failed).
    """
    state = record.get("state")
    recipients = [r for t in record.get("transactions") or [] for r in t.get("recipients") or []]
    statuses = [r.get("status") for r in recipients]
    if state == "rejected":
        if not recipients:
            return exitcodes.DATAERR
        return exitcodes.OK if all(s == "delivered" for s in statuses) else exitcodes.FAILED
    if state != "done":
        return None
    if not recipients:
        return exitcodes.DATAERR
    if record.get("batch_errors") or any(s != "delivered" for s in statuses):
        return exitcodes.FAILED
    return exitcodes.OK


@dataclass
class Waited:
    """What a wait learned: the exit code, the newest record seen, and why it gave up, if so."""

    code: int
    record: dict[str, Any] | None
    problem: str | None = None


class _Unknown(Exception):
    """The outcome cannot be learned now; ``final`` when it never will be."""

    def __init__(self, text: str, *, final: bool) -> None:
        super().__init__(text)
        self.final = final


def query(
    sock_path: Path,
    envelope_id: str,
    timeout: float = _QUERY_TIMEOUT,
    *,
    trusted: Collection[int] | None = None,
) -> dict[str, Any] | None:
    """The worker's record of ``envelope_id`` over the control socket; None if it has none yet.
    The listener must run as one of the ``trusted`` uids (default: root or ourselves), as for
    ``spoolsmtp ctl``: anyone else there is not the worker, and its answer is not believed."""
    allowed = {0, os.geteuid()} if trusted is None else trusted
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(sock_path))
            uid = peer_uid(sock)
            if uid not in allowed:
                text = f"{sock_path} is served by uid {uid}, not by the worker; not believing it"
                raise _Unknown(text, final=True)
            sock.sendall(f"JSON QUERY {envelope_id}\n".encode())
            with sock.makefile("rb") as stream:
                line = stream.readline(16 * 1024 * 1024)
    except OSError as exc:
        final = exc.errno in _NEVER
        text = f"no worker answers at {sock_path}: {exc.strerror or exc}"
        raise _Unknown(text, final=final) from exc
    try:
        answer = json.loads(line)
        status = int(answer["status"])
    except (ValueError, KeyError, TypeError):
        raise _Unknown(f"the worker at {sock_path} gave no answer", final=False) from None
    if status == 404:
        return None
    result = answer.get("result")
    if status != 200 or not isinstance(result, dict):
        raise _Unknown(f"the worker at {sock_path} said {answer.get('error', status)}", final=True)
    return result


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _look(
    path: Path, sock_path: Path, envelope_id: str, trusted: Collection[int] | None
) -> tuple[dict[str, Any] | None, bool]:
    """The record as it is now (None: not written yet, or being replaced: the next look sees
    the whole file), and whether the worker was asked."""
    try:
        found = load_record(path)
        return (found.to_dict() if found is not None else None), False
    except PermissionError:
        return query(sock_path, envelope_id, trusted=trusted), True
    except OSError as exc:
        raise _Unknown(f"cannot read {path}: {exc.strerror or exc}", final=True) from exc


def wait(
    results: Path,
    sock_path: Path,
    envelope_id: str,
    seconds: float,
    *,
    trusted: Collection[int] | None = None,
) -> Waited:
    """Follow the envelope until final or until ``seconds`` pass (0: no limit); a control
    socket is believed only when served by one of the ``trusted`` uids (see ``query``)."""
    path = results / f"{envelope_id}.json"
    deadline = time.monotonic() + seconds if seconds > 0 else None
    record: dict[str, Any] | None = None
    problem: str | None = None
    while True:
        interval = POLL
        try:
            found, asked = _look(path, sock_path, envelope_id, trusted)
            problem = None
            interval = SOCKET_POLL if asked else POLL
            if found is not None:
                record = found
                code = outcome(record)
                if code is not None:
                    return Waited(code, record)
        except _Unknown as exc:
            problem = str(exc)
            if exc.final:
                return Waited(exitcodes.TEMPFAIL, record, problem)
            interval = SOCKET_POLL
        except Exception as exc:  # the mail is queued: never a traceback, never exit 1
            return Waited(exitcodes.TEMPFAIL, record, f"{type(exc).__name__}: {exc}")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return Waited(exitcodes.TEMPFAIL, record, problem)
            interval = min(interval, left)
        time.sleep(interval)
