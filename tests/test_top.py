"""``spoolsmtp top`` (issue 16.7): the frame is a pure function of two snapshots (tested on its
own), and ``top --once`` against a real running worker shows what the worker holds."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from spoolsmtp.app.top_cmd import Snapshot, rates, render
from tests.helpers import draft
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import WorkerProcess, spoolsmtp, start_worker, wait_for

SLOW = {"interval": "1h", "max_interval": "4h", "max_age": "3d", "warning_age": "0"}


def stats(**counters: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "uptime_seconds": 3723.0,
        "files_taken": 0,
        "recipients_delivered": 0,
        "recipients_deferred": 0,
        "recipients_failed": 0,
        "reports_written": 0,
        "deadletters_written": 0,
        "disk_full": False,
    }
    return {**base, **counters}


def query(**more: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "states": {
            "incoming": 2,
            "active": 1,
            "deferred": 5,
            "held": 0,
            "rejected": 0,
            "bounces": 3,
            "deadletter": 0,
        },
        "oldest_seconds": {"deferred": 125.0},
        "destinations": {},
        "suspended": False,
        "disk_full": None,
    }
    return {**base, **more}


def line(frame: list[str], start: str) -> str:
    (found,) = [x for x in frame if x.startswith(start)]
    return found


# -- the frame, pure -----------------------------------------------------------------------------


def test_rates_are_counter_differences_per_second() -> None:
    before = Snapshot(10.0, stats(files_taken=100, recipients_delivered=50), query())
    now = Snapshot(12.0, stats(files_taken=130, recipients_delivered=90), query())
    assert rates(before, now) == {"taken": 15.0, "delivered": 20.0, "deferred": 0.0, "failed": 0.0}
    frame = render(before, now, clock="12:00:00")
    assert line(frame, "rate/s") == "rate/s   taken 15.0  delivered 20.0  deferred 0.0  failed 0.0"


def test_without_an_earlier_snapshot_or_after_a_restart_rates_are_unknown() -> None:
    now = Snapshot(12.0, stats(files_taken=5), query())
    assert set(rates(None, now).values()) == {None}
    restarted = rates(Snapshot(10.0, stats(files_taken=500), query()), now)
    assert restarted["taken"] is None and restarted["delivered"] == 0.0
    assert line(render(None, now, clock="x"), "rate/s") == (
        "rate/s   taken -  delivered -  deferred -  failed -"
    )


def test_the_queue_latency_and_title_lines() -> None:
    now = Snapshot(1.0, stats(delivery_latency_p50_ms=12.5, delivery_latency_p99_ms=900), query())
    frame = render(None, now, clock="05:06:07")
    assert frame[0] == "spoolsmtp top - 05:06:07  up 1h02m  taking files  disk ok"
    assert line(frame, "queue") == "queue    incoming 2  active 1  deferred 5  held 0"
    assert line(frame, "spool ") == "spool    rejected 0  bounces 3  deadletter 0"
    assert line(frame, "oldest") == "oldest   deferred 2m05s"
    assert line(frame, "latency").startswith("latency  p50 12.5 ms  p99 900.0 ms")
    # a STATS without the latency fields (an older worker), or with no sample yet
    for without in (stats(), stats(delivery_latency_p50_ms=None, delivery_latency_p99_ms=None)):
        frame = render(None, Snapshot(1.0, without, query()), clock="x")
        assert line(frame, "latency").startswith("latency  p50 -  p99 -")


def test_dead_destinations_come_first_and_disk_full_and_suspension_show() -> None:
    dests = {
        "busy.example": {
            "envelopes": 9,
            "recipients": 30,
            "next_attempt": "2026-12-01T05:10:00.000Z",
            "dead_until": None,
        },
        "gone.example": {
            "envelopes": 1,
            "recipients": 2,
            "next_attempt": "2026-12-01T05:20:00.000Z",
            "dead_until": "2026-12-01T05:15:00.000Z",
        },
        "evil\x1b[2J.example": {
            "envelopes": 1,
            "recipients": 1,
            "next_attempt": None,
            "dead_until": None,
        },
    }
    q = query(destinations=dests, suspended=True, disk_full="2026-12-01T05:00:00.000Z")
    frame = render(None, Snapshot(1.0, stats(disk_full=True), q), clock="x")
    assert "SUSPENDED" in frame[0] and "DISK FULL since 2026-12-01T05:00:00.000Z" in frame[0]
    head = frame.index(line(frame, "destination"))
    rows = frame[head + 1 :]
    assert rows[0].startswith("gone.example") and rows[0].endswith(
        "05:20:00 UTC  DEAD until 05:15:00 UTC"
    )
    assert rows[1].startswith("busy.example") and re.search(r"\b9\s+30\s+05:10:00 UTC$", rows[1])
    assert rows[2].startswith("evil\\x1b[2J.example")
    assert not any("\x1b" in x for x in frame)


def test_the_frame_fits_the_terminal() -> None:
    dests = {f"d{n}.example": {"envelopes": 1, "recipients": n} for n in range(50)}
    frame = render(None, Snapshot(1.0, stats(), query(destinations=dests)), clock="x", height=20)
    assert len(frame) == 20 and frame[-1] == "... and 41 more destinations"
    assert len([x for x in frame if x.startswith("d")]) == 1 + 9  # the head, 9 of them
    narrow = render(None, Snapshot(1.0, stats(), query()), clock="x", width=30)
    assert max(len(x) for x in narrow) <= 30


# -- against a running worker ---------------------------------------------------------------


def top(w: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*spoolsmtp("top", "--config", str(w.config)), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_top_once_shows_what_the_running_worker_holds(tmp_path: Path) -> None:
    srv = SmtpServer(
        Script(rcpt={"later@example.org": "451 4.3.0 later", "gone@example.org": "550 5.1.1 no"})
    )
    w = start_worker(tmp_path, srv, retry=SLOW, bounces={"requeue": False})
    try:
        w.drop_drafts("a.bsmtp", [draft("o@example.com", ["ok@example.org", "ok2@example.org"])])
        w.drop_drafts("b.bsmtp", [draft("o@example.com", ["later@example.org"])])
        w.drop_drafts("c.bsmtp", [draft("o@example.com", ["gone@example.org"])])
        wait_for(lambda: w.final("a.bsmtp") and w.final("c.bsmtp"))
        wait_for(lambda: w.in_state("b.bsmtp", "deferred"))
        w.drop("not-yet.tmp", b"still being written")  # waits in incoming/, never taken
        done = top(w, "--once", "--interval", "0")
        with_rates = top(w, "--once", "--interval", "200ms")
        destinations = w.ask("QUERY")["result"]["destinations"]
    finally:
        assert w.stop() == 0
        srv.stop()
    assert done.returncode == 0, done.stderr
    frame = done.stdout.splitlines()
    assert "\x1b" not in done.stdout
    assert frame[0].startswith("spoolsmtp top - ") and "taking files  disk ok" in frame[0]
    assert line(frame, "queue") == "queue    incoming 1  active 0  deferred 1  held 0"
    assert line(frame, "spool ") == "spool    rejected 0  bounces 1  deadletter 0"
    assert line(frame, "totals") == (
        "totals   taken 3  delivered 2  deferred 1  failed 1  reports 1  deadletters 0"
    )
    assert line(frame, "rate/s") == "rate/s   taken -  delivered -  deferred -  failed -"
    # the one destination waiting, as QUERY names it, with its one envelope and recipient
    (key,) = destinations
    assert re.fullmatch(rf"{re.escape(key)}\s+1\s+1\s+\d\d:\d\d:\d\d UTC", line(frame, key))
    assert with_rates.returncode == 0, with_rates.stderr
    # nothing moved in between: every rate is measured, and zero
    assert line(with_rates.stdout.splitlines(), "rate/s") == (
        "rate/s   taken 0.0  delivered 0.0  deferred 0.0  failed 0.0"
    )


def test_top_without_a_worker_says_so_in_one_line(tmp_path: Path) -> None:
    w = WorkerProcess(tmp_path, {"smarthost": "127.0.0.1:9"})
    done = top(w, "--once")
    assert done.returncode == 69
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("spoolsmtp top: no worker answers at ")
