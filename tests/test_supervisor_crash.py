"""worker.processes: 2 under kill -9: of a delivery process (the crash hooks of crashpoint.py,
and from outside) and of the supervisor. Nothing is lost, and a recipient is sent twice only
after the dot, flagged ``possible_duplicate``."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import draft
from tests.smtpservers import RawServer, Script, SmtpServer, standard_dialogue
from tests.supervised import (
    TWO,
    alive,
    all_final,
    delivered,
    drop_burst,
    gated_sink,
    holding,
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
        # both processes take part of the burst only if both are ready for it
        holding(worker, two_children(worker))
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
    assert "1 retries in deferred/ no process had told of (delivery process" in log, log
    assert "Traceback" not in log


def test_deferrals_of_the_processes_of_a_killed_supervisor_are_retried(tmp_path: Path) -> None:
    """The supervisor is killed while its processes wait for a slow server; they go on
    draining (SIGTERM) while a new supervisor starts and loads the queue, and defer what
    they had only after that. The new supervisor takes those in when its own processes get
    their nodes, and retries them when due (before, they sat in deferred/ unscheduled, and
    HOLD, FLUSH and DELETE said "no queued envelope", until another restart)."""
    gate = threading.Event()
    held = [0]
    tries: Counter[bytes] = Counter()

    async def rcpt(line: bytes) -> bytes:
        tries[line] += 1
        if tries[line] > 1:
            return b"250 ok\r\n"
        held[0] += 1  # the first try: held until the gate opens, then 451
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
        return b"451 4.3.0 try later\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await standard_dialogue(reader, writer, [], rcpt)

    srv = RawServer(script)
    more: dict[str, Any] = {
        "retry": {"interval": "1s", "max_interval": "1s"},
        "shutdown_timeout": "30s",
    }
    more["delivery"] = {"timeouts": {"rcpt": "30s"}}
    first = supervised(tmp_path, srv.port, **more).start()
    second = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{srv.port}", **TWO, **more})
    try:
        drop_burst(first, 2)
        wait_for(lambda: held[0] == 2, what="both first tries held at the server")
        assert first.proc is not None
        first.proc.kill()
        first.proc.wait()
        second.start()
        wait_for(
            lambda: second.log.read_text().count("supervising 2 delivery processes") == 2,
            what="the new supervisor ready",
        )
        gate.set()  # now the old processes get 451 and defer
        wait_for(lambda: all_final(second, 2), what="both retried and delivered")
    finally:
        gate.set()
        second.stop()
        srv.stop()
    assert sorted(tries.values()) == [2, 2]
    assert "Traceback" not in second.log.read_text()


def test_a_process_started_again_runs_on_the_configuration_of_the_whole(tmp_path: Path) -> None:
    """The file is edited for the next restart (another spool) and then broken; a delivery
    process killed meanwhile starts again on what the supervisor runs on, the same spool,
    and delivers (before, it read the file: it ran on another spool, or could not start)."""
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port).start()
    try:
        kids = two_children(worker)
        good = worker.config.read_text()
        elsewhere = tmp_path / "elsewhere"
        worker.config.write_text(good.replace(str(worker.spool), str(elsewhere)))
        os.kill(kids[0], signal.SIGKILL)
        wait_for(lambda: kids[0] not in two_children(worker), what="started again")
        worker.config.write_text("spool: [broken\n")
        os.kill(kids[1], signal.SIGKILL)
        wait_for(lambda: kids[1] not in two_children(worker), what="started again")
        rcpts = drop_burst(worker, 6)
        wait_for(lambda: all_final(worker, 6), what="6 envelopes done")
        worker.config.write_text(good)
    finally:
        assert worker.stop() == 0
        srv.stop()
    assert set(delivered(srv)) == set(rcpts)
    assert not elsewhere.exists()
    log = worker.log.read_text()
    assert "config error" not in log and "Traceback" not in log, log
