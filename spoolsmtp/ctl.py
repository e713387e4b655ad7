"""``spoolsmtp ctl``: send one command to the worker's control socket and print the answer.

Exit codes: 0 done, 64 bad command, 66 no such envelope, 69 no worker answers, 77 refused,
70 the worker failed to do it.
"""

from __future__ import annotations

import io
import json
import socket
import sys
from pathlib import Path

from spoolsmtp import exitcodes

_EXIT = {200: exitcodes.OK, 400: exitcodes.USAGE, 403: exitcodes.NOPERM, 404: exitcodes.NOINPUT}
SOFTWARE = 70


def run(path: Path, words: list[str], *, as_json: bool, follow: bool, timeout: float = 30.0) -> int:
    command = " ".join(words).strip()
    if not command:
        print("spoolsmtp ctl: no command (try HELP)", file=sys.stderr)
        return exitcodes.USAGE
    if "\n" in command or "\r" in command:
        print("spoolsmtp ctl: one command, one line", file=sys.stderr)
        return exitcodes.USAGE
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        print(f"spoolsmtp ctl: no worker answers at {path}: {exc.strerror or exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    with sock, sock.makefile("rwb") as stream:
        stream.write((("JSON " if as_json else "") + command + "\n").encode("utf-8"))
        stream.flush()
        status = _answer(stream, as_json)
        if not follow or status != exitcodes.OK:
            return status
        sock.settimeout(None)
        stream.write(b"FOLLOW\n")
        stream.flush()
        try:
            for raw in stream:
                sys.stdout.write(raw.decode("utf-8", "replace"))
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
        sys.stdout.write(first.decode("utf-8", "replace"))
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
        print("\n".join(body))
    else:
        print(f"spoolsmtp ctl: {summary}", file=sys.stderr)
    return _EXIT.get(status, SOFTWARE)
