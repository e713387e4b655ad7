"""The journal's mark before a final dot (RFC 5321 section 6.1: from the dot on, a loss may
leave a duplicate) is begun before the transaction (on deck: tests/test_mark_ahead.py), so its
fdatasync runs while MAIL, RCPT and DATA are in flight instead of after the 354; the dot still
waits until it is on disk. A
transaction that ends without its dot takes the mark back (``undot``), so a crash after it does
not count a duplicate that cannot be one.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from spoolsmtp.model.envelope import Recipient
from spoolsmtp.spool.iobatch import IoBatch
from spoolsmtp.spool.journal import Journal, replay
from spoolsmtp.spool.journalmark import JournalMark
from tests.helpers import draft
from tests.hostile import fill, needs_root, small_tmpfs
from tests.smtpservers import RawServer, Script, SmtpServer, read_line, standard_dialogue
from tests.workerproc import WorkerProcess, wait_for

GOOD = "a@example.org"
LATER = "later@example.org"


def _marked(spool: Path) -> bool:
    return _marks(spool) > 0


def _marks(spool: Path) -> int:
    """The ``dot`` lines in the journal's files."""
    return sum(p.read_bytes().count(b'"t":"dot"') for p in (spool / "journal").glob("*.log"))


def test_the_mark_is_on_disk_while_the_server_still_answers_the_envelope(tmp_path: Path) -> None:
    """The server answers RCPT only once the journal on disk holds the dot mark (else 451):
    the mark was begun before the 354, not after it."""
    spool = tmp_path / "spool"
    waited: list[bool] = []

    def mark_written(deadline: float) -> bool:
        while time.monotonic() < deadline:
            if _marked(spool):
                return True
            time.sleep(0.01)
        return False

    async def rcpt(line: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        seen = await loop.run_in_executor(None, mark_written, time.monotonic() + 10)
        waited.append(seen)
        return b"250 2.1.5 ok\r\n" if seen else b"451 4.3.0 no dot mark on disk yet\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await standard_dialogue(reader, writer, [], rcpt)

    srv = RawServer(script)
    w = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{srv.port}"}).start()
    try:
        w.drop_drafts("job.bsmtp", [draft("o@example.com", [GOOD])])
        rec = wait_for(lambda: w.in_state("job.bsmtp", "done", "deferred"), what="an outcome")
    finally:
        assert w.stop() == 0
        srv.stop()
    (result,) = rec["transactions"][0]["recipients"]
    assert waited == [True], (waited, result)
    assert result["status"] == "delivered", result


@pytest.mark.parametrize(
    "script",
    [Script(defer_first={LATER: 1}), Script(mail="451 4.3.0 not now")],
    ids=["one-recipient-refused", "mail-refused"],
)
def test_no_possible_duplicate_is_counted_for_a_recipient_no_dot_went_to(
    tmp_path: Path, script: Script
) -> None:
    """Killed once the attempt's results are journaled; the restart must not flag a recipient
    that was refused before the dot (its mark was taken back), nor one delivered once."""
    srv = SmtpServer(script)
    settings = {"smarthost": f"127.0.0.1:{srv.port}", "retry": {"interval": "1h"}}
    again: WorkerProcess | None = None
    try:
        crashing = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "after_journal"})
        crashing.start().drop_drafts("job.bsmtp", [draft("o@example.com", [GOOD, LATER])])
        assert crashing.wait_exit() == -signal.SIGKILL
        again = WorkerProcess(tmp_path, settings).start()
        rec = wait_for(lambda: again.in_state("job.bsmtp", "done", "deferred"), what="resumed")
        stats = again.ask("STATS")["result"]
    finally:
        if again is not None:
            assert again.stop() == 0
        srv.stop()
    got = Counter(r for m in srv.messages for r in m.rcpt_tos)
    recipients = {r["address"]: r for r in rec["transactions"][0]["recipients"]}
    assert all(n == 1 for n in got.values()), got
    for address, r in recipients.items():
        assert not r.get("possible_duplicate"), (address, r)
    assert stats["possible_duplicates"] == 0
    if script.mail is None:
        assert {a: r["status"] for a, r in recipients.items()} == {
            GOOD: "delivered",
            LATER: "delivered",
        }


def test_a_mark_taken_back_is_that_mark_only(tmp_path: Path) -> None:
    """Taking a mark back cancels that mark, not an earlier one: a recipient whose dot went out
    in an earlier attempt (its reply lost) stays counted when a later attempt's mark is
    withdrawn before its dot, even when the journal holds the withdrawal twice (a segment
    rotation can copy forward a line the same commit writes)."""
    folder = tmp_path / "journal"
    rcpts = [Recipient(GOOD), Recipient(LATER)]

    async def go() -> None:
        journal = Journal(folder, IoBatch())
        try:
            first = JournalMark(journal, "E", 1, rcpts)
            await first.ready(rcpts[:1])  # LATER refused at RCPT: its mark taken back
            second = JournalMark(journal, "E", 1, rcpts)  # a later attempt, ended before its dot
            second.withdraw()
            await journal.commit()
        finally:
            journal.close()

    asyncio.run(go())
    (segment,) = folder.glob("*.log")
    undots = [line for line in segment.read_bytes().splitlines(True) if b'"undot"' in line]
    assert len(undots) == 2
    assert replay(folder)["E"].dots == {(1, GOOD)}
    with open(segment, "ab") as fh:
        fh.writelines(undots)
    assert replay(folder)["E"].dots == {(1, GOOD)}


@needs_root
def test_a_mark_that_met_a_full_disk_is_ready_once_there_is_room(tmp_path: Path) -> None:
    """The mark's commit, begun with MAIL, fails on a full disk; by the dot there is room
    again: the dot goes out (its mark committed then), the transaction is not given up."""
    with small_tmpfs(tmp_path / "fs", size="1m") as fs:
        folder = fs / "journal"

        async def go() -> None:
            journal = Journal(folder, IoBatch())
            try:
                filler = fill(fs)
                mark = JournalMark(journal, "E", 1, [Recipient(GOOD)])
                with pytest.raises(OSError):
                    await journal.commit()  # the mark's own commit failed with it
                filler.unlink()
                await mark.ready([Recipient(GOOD)])
            finally:
                journal.close()

        asyncio.run(go())
        assert replay(folder)["E"].dots == {(1, GOOD)}


async def _silent_after_the_dot(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[bytes]
) -> None:
    """Takes the message and closes the connection without answering the dot."""
    writer.write(b"220 silent.test\r\n")
    while True:
        line = await read_line(reader)
        seen.append(line)
        if line[:4].upper() == b"DATA":
            writer.write(b"354 go ahead\r\n")
            await writer.drain()
            seen.append(await reader.readuntil(b"\r\n.\r\n"))
            return
        writer.write(b"250 ok\r\n")
        await writer.drain()


async def _refuse_hold(line: bytes) -> bytes:
    """MAIL from ``hold@`` is refused for now; any other is taken."""
    return b"451 4.3.0 not now\r\n" if b"<hold@" in line else b"250 ok\r\n"


class _HeldServer:
    """A plain server (no extensions) whose first connection waits for ``gate`` before its
    greeting (and, ``silent``, never answers its dot); MAIL from ``hold@`` is refused (451).
    It counts the connections waiting and the recipients of each message taken."""

    def __init__(self, *, silent: bool = False) -> None:
        self.gate = threading.Event()
        self.waiting = 0
        self.closed = threading.Event()  # the first connection ended
        self.taken: Counter[str] = Counter()
        self._first = True

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first, self._first = self._first, False
            if first:
                self.waiting += 1
                await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 60)
            seen: list[bytes] = []
            try:
                if first and silent:
                    await _silent_after_the_dot(reader, writer, seen)
                else:
                    await standard_dialogue(reader, writer, seen, mail=_refuse_hold)
            finally:
                rcpts = [line for line in seen if line[:4].upper() == b"RCPT"]
                if any(part.endswith(b"\r\n.\r\n") for part in seen):
                    for line in rcpts:
                        self.taken[line[9:].split(b">")[0].decode()] += 1
                if first:
                    self.closed.set()

        self.raw = RawServer(script)
        self.port = self.raw.port

    def stop(self) -> None:
        self.gate.set()
        self.raw.stop()


@needs_root
@pytest.mark.parametrize("answered", [True, False], ids=["taken", "dot-unanswered"])
def test_what_one_destination_took_is_not_sent_again_when_another_failed(
    tmp_path: Path, answered: bool
) -> None:
    """One transaction for two destinations. The first's mark is begun while the journal's
    disk is full, so it cannot be written and the delivery gives up at the dot; the second's
    server takes the message once there is room. The envelope is put back and tried again:
    only the first destination's recipients are sent again (before, both were: the second's a
    second time, flagged). If the second server never answered its dot, its recipient is sent
    again, flagged, and counted once (it was counted twice).

    A mark is begun on deck, next in line for a place (``DestinationLimits.deck``), so for the
    first destination's to be begun on a full disk two deliveries hold its one place and its
    deck; their senders are refused at MAIL (no dot, no result journaled before they let go)."""
    many = [f"r{i:02d}-{'x' * 56}@example.org" for i in range(64)]  # a dot mark over 4 KB
    org, net = _HeldServer(), _HeldServer(silent=not answered)
    try:
        with small_tmpfs(tmp_path / "fs", size="4m") as fs:
            settings = {
                "routes": {
                    "example.org": f"127.0.0.1:{org.port}",
                    "example.net": f"127.0.0.1:{net.port}",
                },
                "spool": {"path": str(fs / "spool"), "min_free_space": 0, "min_free_inodes": 0},
                "delivery": {"timeouts": {"greeting": "60s"}, "max_per_destination": 1},
                "retry": {"interval": "1s", "max_interval": "2s"},
            }
            w = WorkerProcess(tmp_path, settings)
            w.spool = fs / "spool"
            (w.spool / "incoming").mkdir(parents=True, exist_ok=True)
            w.start()
            try:
                # the one holding org's place, then the one on its deck, each marked
                w.drop_drafts("hold0.bsmtp", [draft("hold@example.com", ["h0@example.org"])])
                wait_for(lambda: _marks(w.spool) == 1, what="the first holder marked")
                w.drop_drafts("hold1.bsmtp", [draft("hold@example.com", ["h1@example.org"])])
                wait_for(lambda: _marks(w.spool) == 2, what="the second holder marked")
                assert org.waiting == 1
                w.drop_drafts("job.bsmtp", [draft("o@example.com", [*many, "b@example.net"])])
                wait_for(lambda: net.waiting == 1, what="the second destination connected")
                filler = fill(fs)
                org.gate.set()  # the holders let go; the first's mark fails, and at its dot
                assert org.closed.wait(30), "the first destination gave up"
                filler.unlink()
                net.gate.set()  # room again: its mark is written and the message taken
                rec = wait_for(lambda: w.final("job.bsmtp"), 60, what="all delivered")
                stats = w.ask("STATS")["result"]
            finally:
                assert w.stop() == 0
    finally:
        org.stop()
        net.stop()
    copies = 1 if answered else 2
    assert net.taken == Counter({"b@example.net": copies}), net.taken
    assert org.taken == Counter(dict.fromkeys(many, 1))
    statuses = {r["address"]: r for r in rec["transactions"][0]["recipients"]}
    assert all(r["status"] == "delivered" for r in statuses.values())
    assert statuses["b@example.net"]["possible_duplicate"] == (not answered)
    assert stats["possible_duplicates"] == copies - 1
