"""worker.processes: 2 under kill -9: of a delivery process (the crash hooks of crashpoint.py,
and from outside) and of the supervisor. Nothing is lost, and a recipient is sent twice only
after the dot, flagged ``possible_duplicate``."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import draft
from tests.smtpservers import Script, SmtpServer
from tests.supervised import (
    alive,
    all_final,
    delivered,
    drop_burst,
    gated_sink,
    supervised,
    two_children,
)
from tests.workerproc import WorkerProcess, wait_for


@pytest.mark.parametrize("phase", ["mid_data", "after_dot", "after_journal"])
def test_a_child_killed_mid_delivery_is_restarted_and_loses_nothing(
    tmp_path: Path, phase: str
) -> None:
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port, env={"SPOOLSMTP_CRASH_AT": phase}).start()
    try:
        rcpts = drop_burst(worker, 20)
        wait_for(lambda: all_final(worker, 20), what="20 envelopes done")
        stats = worker.ask("STATS")["result"]
    finally:
        assert worker.stop() == 0
        srv.stop()
    log = worker.log.read_text()
    # each process died at its first delivery (the hook is armed in the first start only)
    assert log.count("was killed by SIGKILL; starting it again") == 2, log
    got = delivered(srv)
    assert set(got) == set(rcpts)
    records = {r["source"]: r for r in worker.records()}
    flagged = 0
    for i, rcpt in enumerate(rcpts):
        (result,) = records[f"job{i}.bsmtp"]["transactions"][0]["recipients"]
        assert result["status"] == "delivered"
        if got[rcpt] == 2:
            # sent again only after the dot (its own, or that of another envelope in flight
            # in the same process when it died), and then flagged
            assert result["possible_duplicate"], (phase, rcpt, result)
            flagged += 1
        else:
            assert got[rcpt] == 1
    assert stats["possible_duplicates"] >= flagged
    assert worker.files("active") == [] and worker.files("incoming") == []
    for node in ("local.1", "local.2"):
        assert list((worker.spool / "nodes" / node / "active").iterdir()) == []


def test_killing_the_supervisor_stops_the_children_and_a_restart_resumes(
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    live, peak = [0], [0]
    sink = gated_sink(gate, live, peak)
    try:
        first = supervised(tmp_path, sink.port, shutdown_timeout="1s").start()
        assert first.proc is not None
        kids = two_children(first)
        drop_burst(first, 6)
        wait_for(lambda: live[0] >= 2, what="deliveries in flight")
        first.proc.send_signal(signal.SIGKILL)
        first.wait_exit()
        wait_for(lambda: not any(alive(k) for k in kids), what="children gone")
        gate.set()
        second = supervised(tmp_path, sink.port).start()
        assert not set(two_children(second)) & set(kids)
        wait_for(lambda: all_final(second, 6), what="all done after the restart")
        assert second.stop() == 0
    finally:
        gate.set()
        sink.stop()
    for rec in second.records():
        (result,) = rec["transactions"][0]["recipients"]
        assert result["status"] == "delivered"
    for node in ("local.1", "local.2"):
        assert list((second.spool / "nodes" / node / "active").iterdir()) == []


def test_a_child_killed_from_outside_is_started_again(tmp_path: Path) -> None:
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port).start()
    try:
        kids = two_children(worker)
        assert worker.ask("TRACE SPOOL")["status"] == 200
        os.kill(kids[0], signal.SIGKILL)
        wait_for(lambda: two_children(worker) != kids, what="a new child")
        rcpts = drop_burst(worker, 10)
        wait_for(lambda: all_final(worker, 10), what="10 envelopes done")
    finally:
        assert worker.stop() == 0
        srv.stop()
    assert delivered(srv) == Counter(rcpts)
    log = worker.log.read_text()
    assert log.count("was killed by SIGKILL") == 1
    # the new process traces too, as the operator asked before it was started
    assert log.count(": claimed as ") == 10


def test_what_a_worker_alone_left_in_flight_is_resumed_by_the_processes(tmp_path: Path) -> None:
    srv = SmtpServer()
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    try:
        alone = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "after_claim"})
        alone.start().drop_drafts("job.bsmtp", [draft("oper@example.com", ["a@example.org"])])
        assert alone.wait_exit() == -signal.SIGKILL
        assert len(alone.files("active")) == 1  # the default node's, claimed, never sent
        worker = supervised(tmp_path, srv.port).start()
        try:
            wait_for(lambda: worker.final("job.bsmtp"), what="delivered by a child")
            # the processes' own nodes are alive, and the supervisor's; ADOPT says so
            assert worker.ask("ADOPT local.1")["status"] == 409
            assert worker.ask("ADOPT local.supervisor")["status"] == 409
            assert worker.ask("ADOPT nosuch")["status"] == 404
        finally:
            assert worker.stop() == 0
    finally:
        srv.stop()
    assert delivered(srv) == Counter({"a@example.org": 1})
    assert worker.files("active") == []
    assert "adopted node (default): 1 envelope(s) in flight" in worker.log.read_text()


def test_a_child_killed_before_telling_of_a_deferral_does_not_strand_it(tmp_path: Path) -> None:
    """A delivery process defers an envelope (it is in deferred/) and is killed before it
    tells the supervisor: the supervisor takes it in when the process dies, and its retry
    comes when due (before, it sat unscheduled in deferred/ until the
    supervisor itself was restarted)."""
    srv = SmtpServer(Script(defer_first={"later@example.org": 1}))
    worker = supervised(
        tmp_path,
        srv.port,
        env={"SPOOLSMTP_CRASH_AT": "queued_untold"},
        retry={"interval": "1s", "max_interval": "1s"},
    ).start()
    try:
        worker.drop_drafts("late.bsmtp", [draft("o@example.com", ["later@example.org"])])
        wait_for(lambda: "was killed by SIGKILL" in worker.log.read_text(), what="the kill")
        record = wait_for(lambda: worker.final("late.bsmtp"), what="delivered by the retry")
    finally:
        assert worker.stop() == 0
        srv.stop()
    assert record["transactions"][0]["recipients"][0]["status"] == "delivered", record
    assert [m.rcpt_tos for m in srv.messages] == [["later@example.org"]]
    log = worker.log.read_text()
    assert "died before telling of 1 retries" in log, log
    assert "Traceback" not in log
