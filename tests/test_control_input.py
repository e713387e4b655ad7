"""Hostile input on the control channel: bad arguments get a 400 and no traceback, a peer
cannot fill the log, and a remote server's text cannot reach an operator's terminal raw."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolsmtp.control.peerlog import PeerLog
from tests.helpers import draft
from tests.hostile import needs_root, run_as_nobody
from tests.smtpservers import RawServer, SmtpServer, read_line
from tests.test_control import ask, ctl, request, sockdir  # noqa: F401 - fixture
from tests.workerproc import WorkerProcess, wait_for

CONTROL_BYTES = {*range(9), *range(11, 32), 127}
# nobody cannot enter /root, where the test's own interpreter may live; these scripts need
# only the standard library
PLAIN_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


@pytest.fixture
def worker(tmp_path: Path, sockdir: Path) -> Iterator[tuple[WorkerProcess, Path]]:  # noqa: F811
    srv = SmtpServer()
    sock = sockdir / "control.sock"
    w = WorkerProcess(
        tmp_path, {"smarthost": f"127.0.0.1:{srv.port}", "control": {"socket": str(sock)}}
    ).start()
    yield w, sock
    w.kill()
    srv.stop()


BAD_ARGUMENTS = [
    "QUERY a\0b",
    "QUERY " + "x" * 300,
    "QUERY ../results/x",
    "QUERY DEST [zzz]",
    "QUERY DEST a..b",
    "QUERY DEST " + "a" * 300,
    "FLUSH DEST [zzz]",
    "FLUSH a\0b",
    "HOLD " + "x" * 300,
    "RELEASE a\0b",
    "EXPIRE [zzz]",
    "EXPIRE a\0b",
]


@pytest.mark.parametrize("line", BAD_ARGUMENTS)
def test_a_bad_argument_is_answered_400_without_a_traceback(
    worker: tuple[WorkerProcess, Path], line: str
) -> None:
    w, sock = worker
    answer = ask(sock, line)
    assert answer["status"] == 400, answer
    assert "Traceback" not in w.log.read_text()
    assert ask(sock, "STATS")["status"] == 200


_FLOOD = """
import socket, sys
path = sys.argv[1]
for i in range(300):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"SHUTDOWN\\nQUERY a\\0b\\nQUERY DEST [zzz]\\nQUIT\\n")
        while s.recv(65536):
            pass
"""


@needs_root
def test_a_flood_of_bad_commands_from_nobody_logs_a_bounded_number_of_lines(
    worker: tuple[WorkerProcess, Path],
) -> None:
    w, sock = worker
    before = len(w.log.read_text().splitlines())
    done = run_as_nobody([PLAIN_PYTHON, "-c", _FLOOD, str(sock)], timeout=120)
    assert done.returncode == 0
    assert ask(sock, "STATS")["status"] == 200
    lines = w.log.read_text().splitlines()[before:]
    assert "Traceback" not in "\n".join(lines)
    assert len(lines) <= 12, "\n".join(lines)
    assert any("refused" in line for line in lines)


async def _escaping_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 raw.test ready\r\n")
    while True:
        line = await read_line(reader)
        verb = line[:4].upper()
        if verb == b"RCPT":
            writer.write(b"550 5.1.1 no \x1b[2J\x1b]0;pwned\x07 such\x08 user\rX \xc2\x9b1m\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            return
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()


def test_remote_text_with_control_characters_is_stored_and_shown_escaped(
    tmp_path: Path,
    sockdir: Path,  # noqa: F811
) -> None:
    srv = RawServer(_escaping_server)
    sock = sockdir / "control.sock"
    w = WorkerProcess(
        tmp_path, {"smarthost": f"127.0.0.1:{srv.port}", "control": {"socket": str(sock)}}
    ).start()
    try:
        w.drop_drafts("e.bsmtp", [draft("o@example.com", ["a@example.org"])])
        rec = wait_for(lambda: w.final("e.bsmtp"))
    finally:
        w.kill()
        srv.stop()
    raw = (w.spool / "results" / f"{rec['id']}.json").read_bytes()
    text = json.loads(raw)["transactions"][0]["recipients"][0]["reply"]["text"]
    assert "\\x1b[2J" in text and "\\x07" in text
    assert not set(text.encode()) & CONTROL_BYTES and "\x9b" not in text
    w.start()
    try:
        out = ctl(w.config, "QUERY", rec["id"])
        as_json = ctl(w.config, "--json", "QUERY", rec["id"])
    finally:
        w.kill()
    assert out.returncode == 0 and "no \\x1b[2J" in out.stdout
    for shown in (out.stdout, as_json.stdout):
        assert not set(shown.replace("\n", "").encode()) & CONTROL_BYTES and "\x9b" not in shown


def test_the_lines_one_uid_causes_are_capped_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    log = PeerLog(logging.getLogger("spoolsmtp.test"), burst=2, window=60.0, clock=lambda: now[0])

    async def flood() -> None:
        for i in range(5):
            log.warning(65534, "refused %d", i)
        log.warning(1000, "another uid has its own allowance")
        now[0] += 61.0
        log.warning(65534, "refused again")
        log.close()

    with caplog.at_level(logging.WARNING, logger="spoolsmtp.test"):
        asyncio.run(flood())
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0",
        "refused 1",
        "another uid has its own allowance",
        "control: suppressed 3 more line(s) caused by uid 65534 in the last 60s",
        "refused again",
    ]


_ASK_ONCE = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\\n")
print(s.recv(65536).decode().splitlines()[0])
"""


@needs_root
@pytest.mark.parametrize(
    ("line", "status"), [("JSON", 400), ("FROB", 400), ("JSON JSON QUERY", 400)]
)
def test_a_line_that_is_no_command_gets_400_from_anyone(
    worker: tuple[WorkerProcess, Path], line: str, status: int
) -> None:
    """Not silence (the client waited out its timeout on "JSON" alone), and not 403 for a
    verb that does not exist (which told a local user it needed root)."""
    _, sock = worker
    done = run_as_nobody(
        [PLAIN_PYTHON, "-c", _ASK_ONCE, str(sock), line], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{status} ") or f'"status": {status}' in done.stdout, done.stdout


def test_ctl_shows_invisible_format_characters_escaped() -> None:
    """Bidi overrides and zero-width characters reorder or hide what an operator reads."""
    from spoolsmtp.control.client import shown

    assert shown("x\u202ey\u200bz\u2066") == "x\\u202ey\\u200bz\\u2066"


@needs_root
def test_other_peoples_envelopes_are_not_listed_to_a_local_user(
    worker: tuple[WorkerProcess, Path],
) -> None:
    """QUERY DEST names the envelopes queued for a destination (ids, file names): the
    operators'. QUERY and STATS stay open; QUERY ID needs an id only its submitter knows."""
    _, sock = worker
    for line, status in (("QUERY DEST example.org", 403), ("QUERY", 200), ("STATS", 200)):
        done = run_as_nobody(
            [PLAIN_PYTHON, "-c", _ASK_ONCE, str(sock), line],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stdout.startswith(f"{status} "), (line, done.stdout, done.stderr)
    assert ask(sock, "QUERY DEST example.org")["status"] == 200  # root: an operator
