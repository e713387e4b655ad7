"""Taking files from incoming/: names the file system allows but text does not (non-UTF-8 bytes,
250 bytes long), writers that keep a file open, and legacy files without line ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from spoolsmtp.spool import intake, legacy
from tests.smtpservers import SmtpServer
from tests.workerproc import WorkerProcess, start_worker, wait_for

BODY = b"HELO h\r\nMAIL FROM:<o@example.com>\r\nRCPT TO:<a@example.org>\r\nDATA\r\nx\r\n.\r\n"


def drop_bytes_name(w: WorkerProcess, name: bytes, data: bytes) -> None:
    """``WorkerProcess.drop`` for a name given as the bytes the file system holds."""
    folder = os.fsencode(w.spool / "incoming")
    tmp = folder + b"/." + name[:200]
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.rename(tmp, folder + b"/" + name)


NAMES = {
    "latin-1": b"caf\xe9-\xff.bsmtp",
    "250 bytes": b"a" * 244 + b".bsmtp",
    "250 bytes of utf-8": "\u00e9".encode() * 120 + b"-bytes.bsmtp"[:10],
}


@pytest.mark.parametrize("content", ["envelope", "not an envelope"])
@pytest.mark.parametrize("name", list(NAMES.values()), ids=list(NAMES))
def test_any_name_the_file_system_allows_is_finished_and_stays_finished(
    tmp_path: Path, server: SmtpServer, name: bytes, content: str
) -> None:
    assert len(name) <= 255
    source = os.fsdecode(name)
    data = BODY if content == "envelope" else b"\x89PNG\r\n\x1a\n\x00\x00"
    w = start_worker(tmp_path, server)
    try:
        drop_bytes_name(w, name, data)
        rec = wait_for(lambda: w.final(source), what="final record")
    finally:
        assert w.stop() == 0
    assert rec["state"] == ("done" if content == "envelope" else "rejected")
    assert len(server.messages) == (1 if content == "envelope" else 0)
    assert w.files("active") == [] and w.files("incoming") == []
    located = w.spool / rec["location"]
    assert located.exists()
    if content != "envelope":
        reason = Path(f"{located}.reason").read_bytes()
        assert "binary content" in rec["reason"]
        # the full name is in the reason even when the rejected copy's name is shortened
        assert source.encode("utf-8", "surrogateescape") in reason or source in reason.decode(
            "utf-8", "backslashreplace"
        )
    again = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{server.port}"}).start()
    try:
        assert again.files("active") == []
        assert w.final(source) == rec
    finally:
        assert again.stop() == 0
    assert b"Traceback" not in w.log.read_bytes()


def test_a_name_never_taken_is_logged_once_and_counted_however_often_it_is_rescanned(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = start_worker(tmp_path, server, spool={"rescan_interval": "50ms"})
    try:
        (w.spool / "incoming" / "tab\there.bsmtp").write_bytes(BODY)
        os.mkfifo(w.spool / "incoming" / "pipe.bsmtp")
        for n in range(3):
            # a hard link makes no event the watcher asks for: only a rescan finds it, so
            # each of these finished means at least one more rescan saw the two bad names
            (tmp_path / f"probe{n}").write_bytes(BODY)
            os.link(tmp_path / f"probe{n}", w.spool / "incoming" / f"probe{n}.bsmtp")
            wait_for(partial(w.final, f"probe{n}.bsmtp"), what=f"probe {n}")
        stats = w.ask("STATS")["result"]
    finally:
        assert w.stop() == 0
    log = w.log.read_bytes()
    assert log.count(b"tab\\there.bsmtp") == 1, log.decode()
    assert log.count(b"pipe.bsmtp") == 1, log.decode()
    assert stats["files_refused"] == 2


WRITER = textwrap.dedent(
    """
    import sys
    path, first, second = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
    with open(path, "wb") as fh:
        fh.write(first)
        fh.flush()
        print("paused", flush=True)
        sys.stdin.readline()  # the test says when to go on
        fh.write(second)
    """
)


def write_with_a_pause(w: WorkerProcess) -> dict[str, Any]:
    """Write ``slow.bsmtp`` into the worker's incoming/ in two parts, the file kept open in
    between until the worker has looked at it past settle_seconds (taken it, or said it waits
    for its writer); return the final record. Both transactions must be in it."""
    first = BODY.decode()
    second = "MAIL FROM:<o@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\ny\r\n.\r\n"
    path = w.spool / "incoming" / "slow.bsmtp"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), first, second],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == "paused\n"
        wait_for(
            lambda: not path.exists() or b"open for writing" in w.log.read_bytes(),
            what="the worker to look at the open file",
        )
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.wait(10) == 0
        rec: dict[str, Any] = wait_for(lambda: w.final("slow.bsmtp"))
    finally:
        writer.kill()
        writer.communicate()
    assert [r["address"] for t in rec["transactions"] for r in t["recipients"]] == [
        "a@example.org",
        "b@example.org",
    ]
    return rec


def test_a_file_still_open_for_writing_is_not_taken_however_long_its_writer_pauses(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = start_worker(
        tmp_path,
        server,
        spool={"settle_seconds": "200ms", "rescan_interval": "100ms"},
        log_level="debug",
    )
    try:
        rec = write_with_a_pause(w)
    finally:
        assert w.stop() == 0
    assert rec["state"] == "done"
    assert sorted(m.rcpt_tos[0] for m in server.messages) == ["a@example.org", "b@example.org"]


CONVERT = textwrap.dedent(
    """
    import resource, sys
    from spoolsmtp.spool import legacy
    from spoolsmtp.model.config import SpoolConfig
    cfg = SpoolConfig(strip_trailing_blanks=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
        legacy.transcode(src, dst, cfg)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(after - before)
    """
)


@pytest.mark.parametrize("blank", [False, True], ids=["text", "all-blanks"])
def test_a_legacy_file_without_line_ends_converts_in_bounded_memory(
    tmp_path: Path, blank: bool
) -> None:
    """Also a file that is one run of blanks with no line end: its blanks may not all be
    held back in case the line ends (they were, and 64 MB of them took 210 MB)."""
    size = 64 * 1024 * 1024
    src, dst = tmp_path / "in", tmp_path / "out"
    with open(src, "wb") as fh:
        block = b" " * 1024 * 1024 if blank else (b"x" * 1023 + b" ") * 1024
        for _ in range(size // len(block)):
            fh.write(block)
    done = subprocess.run(
        [sys.executable, "-c", CONVERT, str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        check=True,
    )
    grown_kib = int(done.stdout)
    assert grown_kib < 48 * 1024, f"RSS grew by {grown_kib} KiB converting {size} bytes"
    if blank:  # blanks past what is held back are written; those held at the end stripped
        assert size - legacy.MAX_HELD_BLANKS <= dst.stat().st_size <= size
    else:
        assert dst.stat().st_size == size - 1  # the one trailing blank stripped


def test_a_file_that_changes_while_it_is_read_is_an_error_not_a_silent_cut(
    tmp_path: Path,
) -> None:
    """What a writer adds while the worker reads a claimed file is never silently dropped:
    the read says the file changed (the worker rejects it with that reason)."""
    path = tmp_path / "growing.bsmtp"
    path.write_bytes(BODY)

    def read_while_it_grows(fh: BinaryIO) -> bytes:
        data = fh.read()
        with open(path, "ab") as writer:
            writer.write(b"MAIL FROM:<o@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        return data

    fd, _ = intake.open_regular(str(path))
    with os.fdopen(fd, "rb") as fh, pytest.raises(intake.Changed, match="changed while"):
        intake.checked(read_while_it_grows, fh)
    fd, _ = intake.open_regular(str(path))
    with os.fdopen(fd, "rb") as fh:
        assert intake.checked(_read, fh) == (path.read_bytes())


def _read(fh: BinaryIO) -> bytes:
    return fh.read()
