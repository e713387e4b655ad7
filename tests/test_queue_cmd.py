"""``spoolsmtp queue`` (issue 16.4): mailq's listing and postqueue -j's JSON, read from a real
spool that a real worker filled (envelopes deferred, held, being delivered, not yet taken),
with the worker stopped and running, and as an operator who may only read the spool."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.model.record import parse_iso
from tests.helpers import draft
from tests.hostile import reachable_by_others, run_as_nobody
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import WorkerProcess, spoolsmtp, start_worker, wait_for

LATER = "451 4.3.0 come back later"
SLOW = {"interval": "1h", "max_interval": "4h", "max_age": "3d", "warning_age": "0"}


def queue(w: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*spoolsmtp("queue", "--config", str(w.config)), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def queue_json(w: WorkerProcess, *args: str) -> list[dict[str, Any]]:
    done = queue(w, "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def stopped(tmp_path: Path) -> Iterator[tuple[WorkerProcess, dict[str, str]]]:
    """A stopped worker's spool holding: ``deferred`` (two recipients at example.org, the
    last reply 451, one delivered already to example.net), ``held`` (from held@example.com),
    ``waiting`` (in incoming/, never taken), and one finished envelope (not in the queue)."""
    srv = SmtpServer(Script(rcpt={"later@example.org": LATER, "again@example.org": LATER}))
    w = start_worker(tmp_path, srv, retry=SLOW)
    try:
        w.drop_drafts(
            "deferred.bsmtp",
            [draft("o@example.com", ["later@example.org", "again@example.org", "a@example.net"])],
        )
        w.drop_drafts("finished.bsmtp", [draft("o@example.com", ["b@example.net"])])
        w.drop_drafts("held.bsmtp", [draft("held@example.com", ["later@example.org"])])
        wait_for(lambda: w.final("finished.bsmtp"))
        wait_for(lambda: w.in_state("deferred.bsmtp", "deferred"))
        held = wait_for(lambda: w.in_state("held.bsmtp", "deferred"))
        assert w.ask(f"HOLD {held['id']}")["status"] == 200
        wait_for(lambda: w.in_state("held.bsmtp", "held"))
    finally:
        assert w.stop() == 0
        srv.stop()
    w.drop_drafts("waiting.bsmtp", [draft("", ["x@example.org"])])
    ids = {source: rec["id"] for rec in w.records() if (source := rec["source"])}
    yield w, ids


def test_queue_lists_what_waits_like_mailq(
    stopped: tuple[WorkerProcess, dict[str, str]],
) -> None:
    w, ids = stopped
    done = queue(w)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("-Queue ID-") and "-Sender/Recipient-" in lines[0]
    text = done.stdout
    assert ids["finished.bsmtp"] not in text
    deferred = next(i for i, line in enumerate(lines) if line.startswith(ids["deferred.bsmtp"]))
    assert lines[deferred].split()[-1] == "o@example.com"
    # the pending recipients under their last reply; the delivered one is not listed
    assert lines[deferred + 1] == f"({LATER})"
    assert [line.strip() for line in lines[deferred + 2 : deferred + 4]] == [
        "later@example.org",
        "again@example.org",
    ]
    assert "a@example.net" not in text
    assert any(line.startswith(ids["held.bsmtp"] + "!") for line in lines)
    assert any(line.startswith("waiting.bsmtp+") and "MAILER-DAEMON" in line for line in lines)
    sizes = [
        (w.spool / "deferred" / f"{ids['deferred.bsmtp']}.bsmtp").stat().st_size,
        (w.spool / "hold" / f"{ids['held.bsmtp']}.bsmtp").stat().st_size,
        (w.spool / "incoming" / "waiting.bsmtp").stat().st_size,
    ]
    assert lines[-1] == f"-- {(sum(sizes) + 1023) // 1024} Kbytes in 3 Requests."


def test_queue_json_is_one_object_a_line_matching_the_records(
    stopped: tuple[WorkerProcess, dict[str, str]],
) -> None:
    w, ids = stopped
    found = {o["queue_id"]: o for o in queue_json(w)}
    assert set(found) == {ids["deferred.bsmtp"], ids["held.bsmtp"], "waiting.bsmtp"}
    for source, state in (("deferred.bsmtp", "deferred"), ("held.bsmtp", "hold")):
        rec = w.record_for(source)
        assert rec is not None
        got = found[rec["id"]]
        assert got["queue_name"] == state
        assert got["arrival_time"] == int(parse_iso(rec["received_at"]).timestamp())
        path = w.spool / state / f"{rec['id']}.bsmtp"
        assert got["message_size"] == path.stat().st_size
        assert got["sender"] == rec["transactions"][0]["mail_from"]
        assert got["source"] == source
        pending = [
            r for t in rec["transactions"] for r in t["recipients"] if r["status"] == "deferred"
        ]
        assert [r["address"] for r in got["recipients"]] == [r["address"] for r in pending]
        for mine, theirs in zip(got["recipients"], pending, strict=True):
            assert mine["delay_reason"] == f"{theirs['reply']['code']} " + (
                f"{theirs['reply']['enhanced']} {theirs['reply']['text']}"
            )
            assert mine["attempts"] == theirs["attempts"] == 1
            assert mine["next_attempt_time"] == int(
                parse_iso(theirs["next_attempt_at"]).timestamp()
            )
    assert found[ids["deferred.bsmtp"]]["delivered"] == 1
    waiting = found["waiting.bsmtp"]
    assert waiting["queue_name"] == "incoming" and waiting["sender"] == ""
    assert [r["address"] for r in waiting["recipients"]] == ["x@example.org"]
    assert "delay_reason" not in waiting["recipients"][0]


def test_queue_filters(stopped: tuple[WorkerProcess, dict[str, str]]) -> None:
    w, ids = stopped

    def listed(*args: str) -> set[str]:
        return {o["queue_id"] for o in queue_json(w, *args)}

    everything = {ids["deferred.bsmtp"], ids["held.bsmtp"], "waiting.bsmtp"}
    assert listed("--state", "hold") == listed("--state", "held") == {ids["held.bsmtp"]}
    assert listed("--state", "deferred,incoming") == {ids["deferred.bsmtp"], "waiting.bsmtp"}
    assert listed("--state", "active") == set()
    assert listed("--sender", "held@example.com") == {ids["held.bsmtp"]}
    assert listed("--sender", "<>") == {"waiting.bsmtp"}
    assert listed("--sender", "<O@Example.com>") == {ids["deferred.bsmtp"]}
    # a destination only counts while a recipient there is still pending
    assert listed("--destination", "example.net") == set()
    assert listed("--destination", "EXAMPLE.org") == everything
    assert listed("--younger-than", "1h") == everything
    assert listed("--older-than", "1h") == set()
    bad = queue(w, "--state", "done")
    assert bad.returncode == 64 and "--state" in bad.stderr and bad.stdout == ""
    bad = queue(w, "--older-than", "soon")
    assert bad.returncode == 64 and "--older-than" in bad.stderr
    empty = queue(w, "--older-than", "1d")
    assert empty.stdout == "Mail queue is empty\n"


def test_queue_needs_only_read_access(stopped: tuple[WorkerProcess, dict[str, str]]) -> None:
    """An operator who may read the spool (here: uid nobody, the spool readable by others,
    writable by no one but root) lists it; a folder they may not read is named, not fatal."""
    w, ids = stopped
    reachable_by_others(w.spool)
    for path in [w.spool, *w.spool.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    w.config.chmod(0o644)
    reachable_by_others(w.config.parent)
    argv = spoolsmtp("queue", "--config", str(w.config), "--json")
    done = run_as_nobody(argv, capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert {json.loads(line)["queue_id"] for line in done.stdout.splitlines()} == {
        ids["deferred.bsmtp"],
        ids["held.bsmtp"],
        "waiting.bsmtp",
    }
    (w.spool / "hold").chmod(0o700)
    done = run_as_nobody(argv, capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 77
    assert done.stderr.strip() == f"spoolsmtp queue: {w.spool / 'hold'}: permission denied"
    listed = {json.loads(line)["queue_id"] for line in done.stdout.splitlines()}
    assert listed == {ids["deferred.bsmtp"], "waiting.bsmtp"}


def test_queue_while_the_worker_moves_files(tmp_path: Path) -> None:
    """With the worker running: an envelope being delivered is listed as active (``*``), and
    listings taken while the worker moves dozens of files keep working (files that vanish
    between the folder listing and their reading are left out, never an error)."""
    gate = threading.Event()
    srv = SmtpServer(Script(gate=gate))
    # the gate holds the first transaction while queue runs: not for 3 s (the test default)
    phases = ("connect", "greeting", "ehlo", "mail", "rcpt", "data", "data_block", "data_end")
    w = start_worker(tmp_path, srv, delivery={"timeouts": dict.fromkeys(phases, "60s")})
    try:
        w.drop_drafts("first.bsmtp", [draft("o@example.com", ["a@example.org"])])
        rec = wait_for(lambda: w.in_state("first.bsmtp", "active"))
        (active,) = queue_json(w, "--state", "active")
        assert active["queue_id"] == rec["id"] and active["queue_name"] == "active"
        assert any(line.startswith(rec["id"] + "*") for line in queue(w).stdout.splitlines())
        gate.set()
        for n in range(60):
            w.drop_drafts(f"j{n}.bsmtp", [draft("o@example.com", [f"r{n}@example.org"])])
        listings = 0
        deadline = time.monotonic() + 60
        while not all(w.final(f"j{n}.bsmtp") for n in range(60)):
            assert time.monotonic() < deadline, "the worker did not finish"
            done = queue(w, "--json")
            assert done.returncode == 0, done.stderr
            for line in done.stdout.splitlines():
                assert json.loads(line)["queue_name"] in ("incoming", "active", "deferred")
            listings += 1
        assert listings >= 1
        assert queue(w).stdout == "Mail queue is empty\n"
    finally:
        gate.set()
        w.stop()
        srv.stop()
