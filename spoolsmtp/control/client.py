"""``spoolsmtp ctl``: send one command to the worker's control socket and print the answer.

The operators' socket is tried first (others cannot reach it, so they cannot jam it), then the
public one. A full backlog is retried until the timeout rather than failing at once, and the
answer must come from root, from us, or from the worker's own user: a process of someone else
listening where the worker should is not believed. Everything printed has its control
characters escaped, so text that came from a remote server cannot drive the terminal.

Exit codes: 0 done, 64 bad command, 66 no such envelope, 69 no worker answers, 77 refused,
70 the worker failed to do it, 75 the envelope is being delivered right now (try again).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pwd
import re
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from spoolsmtp.model import exitcodes

_EXIT = {
    200: exitcodes.OK,
    400: exitcodes.USAGE,
    403: exitcodes.NOPERM,
    404: exitcodes.NOINPUT,
    409: exitcodes.TEMPFAIL,  # ADOPT of a live node; an envelope being delivered: try again
}
SOFTWARE = 70


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_JSON_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # json.dumps leaves DEL and C1 raw
_BUSY = (errno.EAGAIN, errno.EWOULDBLOCK)


# the invisible format characters that reorder or hide text on a terminal (bidi overrides,
# zero-width characters, line and paragraph separators, the byte-order mark)
_FORMAT = re.compile("[\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def shown(text: str) -> str:
    """Text for the terminal: control characters other than newline as ``\\xNN``, invisible
    format characters as ``\\uNNNN``."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return _FORMAT.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _shown_json(text: str) -> str:
    """A JSON line with every control character as a JSON ``\\uNNNN`` escape: still JSON."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text.rstrip("\n")) + "\n"


class Unreachable(Exception):
    """No worker could be reached at any of the paths; the message says why."""


def connect(paths: Sequence[Path], timeout: float, trusted: Iterable[int]) -> socket.socket:
    """A connection to the first path a worker answers on, retrying a full backlog (EAGAIN)
    until ``timeout``; the listener must run as one of the ``trusted`` uids."""
    deadline = time.monotonic() + timeout
    allowed = set(trusted)
    why = "no control socket configured"
    for path in paths:
        while True:
            try:
                sock = connect_once(path, max(0.1, deadline - time.monotonic()))
            except OSError as exc:
                if exc.errno in _BUSY and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                why = f"no worker answers at {path}: {exc.strerror or exc}"
                break
            uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid not in allowed:
                sock.close()
                raise Unreachable(
                    f"{path} is served by uid {uid}, not by the worker; not talking to it"
                )
            return sock
    raise Unreachable(why)


def connect_once(path: Path, timeout: float) -> socket.socket:
    """Connect through the folder's descriptor, which also works for paths longer than the
    108 octets a socket address holds."""
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(f"/proc/self/fd/{folder}/{path.name}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(folder)
    return sock


def trusted_uids(*, worker_user: str | None, spool_folder: Path | None) -> set[int]:
    """Who may answer as the worker: root, ourselves, the configured worker user, and the
    owner of the spool's own folders (a worker started as its user without ``user:``), when
    the config names them by an absolute path (a relative one would be whatever folder of
    that name is under the caller's current folder)."""
    uids = {0, os.geteuid()}
    if worker_user:
        with contextlib.suppress(KeyError):
            uids.add(
                int(worker_user) if worker_user.isdigit() else pwd.getpwnam(worker_user).pw_uid
            )
    if spool_folder is not None and spool_folder.is_absolute():
        with contextlib.suppress(OSError):
            uids.add(spool_folder.stat().st_uid)
    return uids


def socket_owner(path: Path) -> set[int]:
    """The owner of the folder of a socket the operator named (``ctl --socket``), when only
    that owner can place a socket there (no write bit for group or others): the worker's user
    even when no config says who that is."""
    try:
        info = path.parent.stat()
    except OSError:
        return set()
    return set() if info.st_mode & 0o022 else {info.st_uid}


def targets(
    operator_socket: Path,
    control_socket: Path,
    worker_user: str | None,
    spool_folder: Path,
    socket: Path | None,
) -> tuple[list[Path], set[int]]:
    """The sockets to try (``socket``, the one the operator named, else the operators' then
    the public one) and who may answer on them, for ``ctl`` and ``top`` alike."""
    trusted = trusted_uids(worker_user=worker_user, spool_folder=spool_folder)
    if socket is not None:
        return [socket], trusted | socket_owner(socket)
    return [operator_socket, control_socket], trusted


def run(
    paths: Path | Sequence[Path],
    words: list[str],
    *,
    as_json: bool,
    follow: bool,
    timeout: float = 30.0,
    trusted: Iterable[int] | None = None,
) -> int:
    if isinstance(paths, Path):
        paths = [paths]
    command = " ".join(words).strip()
    if not command:
        print("spoolsmtp ctl: no command (try HELP)", file=sys.stderr)
        return exitcodes.USAGE
    if "\n" in command or "\r" in command:
        print("spoolsmtp ctl: one command, one line", file=sys.stderr)
        return exitcodes.USAGE
    try:
        sock = connect(paths, timeout, {0, os.geteuid()} if trusted is None else trusted)
    except Unreachable as exc:
        print(f"spoolsmtp ctl: {shown(str(exc))}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    sock.settimeout(timeout)
    with sock, sock.makefile("rwb") as stream:
        try:
            stream.write((("JSON " if as_json else "") + command + "\n").encode("utf-8"))
            stream.flush()
            status = _answer(stream, as_json)
        except (TimeoutError, ConnectionResetError) as exc:
            print(f"spoolsmtp ctl: the worker went away: {exc}", file=sys.stderr)
            return exitcodes.UNAVAILABLE
        if not follow or status != exitcodes.OK:
            return status
        sock.settimeout(None)
        stream.write(b"FOLLOW\n")
        stream.flush()
        try:
            for raw in stream:
                sys.stdout.write(shown(raw.decode("utf-8", "replace")))
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        return exitcodes.OK


def _answer(stream: io.BufferedIOBase, as_json: bool) -> int:
    readline = stream.readline
    first = readline()
    if not first:
        print("spoolsmtp ctl: the worker closed the connection", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    if as_json:
        sys.stdout.write(_shown_json(first.decode("utf-8", "replace")))
        try:
            status = int(json.loads(first)["status"])
        except (ValueError, KeyError):
            return SOFTWARE
        return _EXIT.get(status, SOFTWARE)
    head = first.decode("utf-8", "replace").rstrip("\n")
    code_text, _, summary = head.partition(" ")
    status = int(code_text) if code_text.isdigit() else 500
    body: list[str] = []
    while True:
        raw = readline()
        if not raw:
            break
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if line == ".":
            break
        body.append(line[1:] if line.startswith("..") else line)
    if status == 200:
        print(shown("\n".join(body)))
    else:
        print(f"spoolsmtp ctl: {shown(summary)}", file=sys.stderr)
    return _EXIT.get(status, SOFTWARE)
