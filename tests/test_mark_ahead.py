"""The mark before a final dot (RFC 5321 section 6.1) is begun on deck: while a delivery waits,
next in line, for one of its destination's places, so its commit runs while the connection it
will get still carries the transaction before it. At most as many deliveries wait marked on
deck as hold a place, so a crash flags at most that many more recipients that no dot went to.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tests.helpers import draft
from tests.smtpservers import RawServer, standard_dialogue
from tests.workerproc import WorkerProcess, wait_for

ADDRESSES = ["a1@example.org", "a2@example.org", "a3@example.org"]


def _named(spool: Path, kind: str) -> list[list[str]]:
    """The recipients each ``kind`` line (``dot``, ``undot``) in the journal's files names."""
    tag = f'"t":"{kind}"'.encode()
    return [
        json.loads(line)["rcpts"]
        for segment in (spool / "journal").glob("*.log")
        for line in segment.read_bytes().splitlines()
        if tag in line
    ]


def _marked(spool: Path) -> set[str]:
    """The recipients a ``dot`` line names."""
    return {address for rcpts in _named(spool, "dot") for address in rcpts}


def _dot_lines(spool: Path, address: str) -> int:
    """How many ``dot`` lines name ``address``."""
    return sum(address in rcpts for rcpts in _named(spool, "dot"))


def _undone(spool: Path, address: str) -> bool:
    """Whether an ``undot`` line names ``address``."""
    return any(address in rcpts for rcpts in _named(spool, "undot"))


def _closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _poll(check: Callable[[], bool], seconds: float) -> bool:
    """``wait_for`` for a server's thread, which answers either way: whether ``check`` held
    within ``seconds``."""
    try:
        wait_for(check, seconds)
    except AssertionError:
        return False
    return True


async def _dialogue(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    at_end_of_data: Callable[[str], bool],
    texts: list[str] | None = None,
) -> None:
    """A plain server (no extensions); at the end of each message's text (its recipient
    appended to ``texts``) it calls ``at_end_of_data(recipient)`` in a thread, and closes the
    connection if that says so."""

    async def dot(received: list[bytes]) -> bool:
        last = next(line for line in reversed(received) if line[:4].upper() == b"RCPT")
        rcpt = last.decode().partition("<")[2].partition(">")[0]
        if texts is not None:
            texts.append(rcpt)
        return await asyncio.get_running_loop().run_in_executor(None, at_end_of_data, rcpt)

    await standard_dialogue(reader, writer, [], dot=dot)


def _settings(port: int) -> dict[str, object]:
    return {
        "smarthost": f"127.0.0.1:{port}",
        "retry": {"interval": "1s"},
        "delivery": {"max_per_destination": 1, "timeouts": {"data_end": "30s"}},
    }


def test_the_next_delivery_is_marked_while_the_one_before_awaits_its_dot_reply(
    tmp_path: Path,
) -> None:
    """One place at the destination, two envelopes: the server answers the first message's
    dot only once the journal holds the mark of the second, which is still waiting for the
    place. (Before, that mark was begun once the place was had: the server waited in vain.)"""
    spool = tmp_path / "spool"
    first: list[str] = []
    seen: list[bool] = []

    def hold_first(rcpt: str) -> bool:
        if not first:
            first.append(rcpt)
            others = set(ADDRESSES[:2]) - {rcpt}
            seen.append(_poll(lambda: bool(_marked(spool) & others), 5.0))
            # the dot now due waits on the mark begun on deck, not on one begun anew
            seen.append(_dot_lines(spool, rcpt) == 1)
        return False

    srv = RawServer(lambda r, wr: _dialogue(r, wr, hold_first))
    w = WorkerProcess(tmp_path, _settings(srv.port))
    w.start()
    try:
        for i, address in enumerate(ADDRESSES[:2]):
            w.drop_drafts(f"job{i}.bsmtp", [draft("o@example.com", [address])])
        for i in range(2):
            rec = wait_for(partial(w.in_state, f"job{i}.bsmtp", "done"), what="delivered")
            assert rec["transactions"][0]["recipients"][0]["status"] == "delivered"
    finally:
        assert w.stop() == 0
        srv.stop()
    assert seen == [True, True], first


def test_a_crash_flags_no_delivery_beyond_those_on_deck(tmp_path: Path) -> None:
    """One place, three envelopes; killed while the first message's dot awaits its reply and
    the second waits marked on deck. The restart flags those two as possible duplicates (the
    first had its dot sent; the second is the price of marking ahead) and not the third, which
    waited for a place on deck, unmarked. Each is delivered once more at most."""
    checked: list[tuple[str, set[str]]] = []
    texts: list[str] = []
    workers: list[WorkerProcess] = []

    def crash_at_first(rcpt: str) -> bool:
        if checked:
            return False  # the restarted worker's connections: a plain server
        (w,) = workers

        def all_taken() -> bool:
            return all(w.in_state(f"job{i}.bsmtp", "active") is not None for i in range(3))

        others = set(ADDRESSES) - {rcpt}
        on_deck = _poll(lambda: bool(_marked(w.spool) & others), 10.0)
        taken = _poll(all_taken, 10.0)
        checked.append((rcpt, _marked(w.spool) if on_deck and taken else set()))
        assert w.proc is not None
        os.kill(w.proc.pid, signal.SIGKILL)
        return True

    srv = RawServer(lambda r, wr: _dialogue(r, wr, crash_at_first, texts))
    w = WorkerProcess(tmp_path, _settings(srv.port))
    workers.append(w)
    again: WorkerProcess | None = None
    try:
        w.start()
        for i, address in enumerate(ADDRESSES):
            w.drop_drafts(f"job{i}.bsmtp", [draft("o@example.com", [address])])
        assert w.wait_exit() == -signal.SIGKILL
        again = WorkerProcess(tmp_path, _settings(srv.port)).start()
        recs = [
            wait_for(partial(again.in_state, f"job{i}.bsmtp", "done"), what="delivered")
            for i in range(3)
        ]
        stats = again.ask("STATS")["result"]
    finally:
        if again is not None:
            assert again.stop() == 0
        srv.stop()
    ((held, marked),) = checked
    assert len(marked) == 2 and held in marked, marked  # the held one and one on deck
    flagged = {
        r["address"]
        for rec in recs
        for r in rec["transactions"][0]["recipients"]
        if r.get("possible_duplicate")
    }
    assert flagged == marked
    assert stats["possible_duplicates"] == 2
    # the held one's text arrived twice (the section 6.1 duplicate, flagged); others once
    assert Counter(texts) == {a: 2 if a == held else 1 for a in ADDRESSES}


def test_a_mark_begun_on_deck_for_a_host_never_reached_is_taken_back(tmp_path: Path) -> None:
    """The destination refuses the connection: no transaction took the mark begun on deck, so
    it is taken back, and a crash after the attempt's results flags nothing."""
    settings = {"smarthost": f"127.0.0.1:{_closed_port()}", "retry": {"interval": "1h"}}
    crashing = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "after_journal"})
    crashing.start().drop_drafts("job.bsmtp", [draft("o@example.com", [ADDRESSES[0]])])
    assert crashing.wait_exit() == -signal.SIGKILL
    again = WorkerProcess(tmp_path, settings).start()
    try:
        rec = wait_for(lambda: again.in_state("job.bsmtp", "deferred"), what="deferred")
        stats = again.ask("STATS")["result"]
    finally:
        assert again.stop() == 0
    (r,) = rec["transactions"][0]["recipients"]
    assert r["status"] == "deferred" and not r.get("possible_duplicate"), r
    assert stats["possible_duplicates"] == 0


def test_a_destination_never_reached_is_not_flagged_while_another_still_runs(
    tmp_path: Path,
) -> None:
    """One transaction for two destinations: the first refuses the connection, the second
    holds its greeting. The first's mark, begun on deck, is taken back at once, not only
    with the transaction's results (which wait for the second): killed while the second is
    held, the restart flags only the second, whose mark was begun as it took its place."""
    held = threading.Event()
    connected = threading.Event()

    async def greeting_held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not connected.is_set():
            connected.set()
            await asyncio.get_running_loop().run_in_executor(None, held.wait, 60)
            return
        await _dialogue(reader, writer, lambda rcpt: False)

    srv = RawServer(greeting_held)
    refused, reached = "x@example.org", "y@example.net"
    settings = {
        "routes": {
            "example.org": f"127.0.0.1:{_closed_port()}",
            "example.net": f"127.0.0.1:{srv.port}",
        },
        "retry": {"interval": "1s"},
        "delivery": {"timeouts": {"greeting": "60s"}},
    }
    w = WorkerProcess(tmp_path, settings).start()
    again: WorkerProcess | None = None
    try:
        w.drop_drafts("job.bsmtp", [draft("o@example.com", [refused, reached])])
        wait_for(connected.is_set, what="the second destination connected")
        wait_for(lambda: _undone(w.spool, refused), what="the first's mark taken back")
        w.kill()
        held.set()
        again = WorkerProcess(tmp_path, settings).start()
        resumed = again

        def reached_delivered() -> dict[str, Any] | None:
            rec = resumed.in_state("job.bsmtp", "deferred", "done")
            rcpts = rec["transactions"][0]["recipients"] if rec is not None else []
            return rec if any(r["status"] == "delivered" for r in rcpts) else None

        rec = wait_for(reached_delivered, what="the second destination delivered")
        stats = again.ask("STATS")["result"]
    finally:
        w.kill()
        if again is not None:
            assert again.stop() == 0
        held.set()
        srv.stop()
    # the second was marked, holding its place (the price of marking ahead); the first not
    flagged = {
        r["address"] for r in rec["transactions"][0]["recipients"] if r.get("possible_duplicate")
    }
    assert flagged == {reached}, flagged
    assert stats["possible_duplicates"] == 1
