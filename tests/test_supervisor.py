"""worker.processes: 2 as an operator runs it: a supervisor and two delivery processes, real
processes, a real SMTP sink on loopback (crashes and kills: test_supervisor_crash.py)."""

from __future__ import annotations

import os
import re
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import draft
from tests.hostile import PLAIN_PYTHON, needs_root, nobody
from tests.smtpservers import Script, SmtpServer
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
from tests.test_intake import write_with_a_pause
from tests.test_privileges import PLAIN_PATH
from tests.workerproc import WorkerProcess, connect, exchange, wait_for


def test_two_processes_deliver_a_burst_once_each_and_stats_show_the_whole(
    tmp_path: Path,
) -> None:
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port).start()
    try:
        holding(worker, two_children(worker))  # both ready, so both can claim some
        assert worker.ask("TRACE SPOOL")["status"] == 200
        rcpts = drop_burst(worker, 60)
        wait_for(lambda: all_final(worker, 60), what="60 envelopes done")
        stats = wait_for(
            lambda: (s := worker.ask("STATS")["result"])["recipients_delivered"] == 60 and s
        )
        assert stats["files_taken"] == 60
        assert stats["queue_active"] == 0
        assert stats["connections_opened"] >= 2  # each process has its own
        query = worker.ask("QUERY")["result"]
        assert query["states"]["incoming"] == 0 and query["states"]["active"] == 0
    finally:
        assert worker.stop() == 0
        srv.stop()
    assert delivered(srv) == Counter(rcpts)
    # both processes claimed some: their traced claims carry their pids
    claims = re.findall(
        rb"spoolsmtp\[(\d+)\] INFO trace \S+ spool: job\d+\.bsmtp: claimed",
        (worker.log.read_bytes()),
    )
    assert len(claims) == 60 and len(set(claims)) == 2
    assert worker.files("active") == [] and worker.files("incoming") == []


def test_hold_release_and_flush_reach_the_process_that_retries(tmp_path: Path) -> None:
    rcpt = "slow@example.org"
    srv = SmtpServer(Script(defer_first={rcpt: 2}))
    worker = supervised(tmp_path, srv.port).start()
    try:
        worker.drop_drafts("job.bsmtp", [draft("oper@example.com", [rcpt])])
        rec = wait_for(lambda: worker.in_state("job.bsmtp", "deferred"), what="deferred")
        envelope_id = rec["id"]
        query = worker.ask("QUERY")["result"]
        assert query["states"]["deferred"] == 1
        assert worker.ask(f"HOLD {envelope_id}")["result"]["messages"] == [f"{envelope_id} held"]
        assert (worker.spool / "hold" / f"{envelope_id}.bsmtp").exists()
        assert worker.ask("QUERY")["result"]["states"]["held"] == 1
        assert worker.ask(f"QUERY {envelope_id}")["result"]["state"] == "held"
        # RELEASE retries at once: the second try is deferred again
        assert worker.ask(f"RELEASE {envelope_id}")["status"] == 200
        wait_for(lambda: _attempts(worker, rcpt) == 2, what="retried after RELEASE")
        wait_for(lambda: worker.in_state("job.bsmtp", "deferred"), what="deferred again")
        # FLUSH retries now: the third try is accepted
        wait_for(lambda: worker.ask("FLUSH")["result"]["scheduled"] == 1, what="FLUSH")
        wait_for(lambda: worker.final("job.bsmtp"), what="delivered after FLUSH")
        assert worker.ask("QUERY")["result"]["states"]["deferred"] == 0
    finally:
        assert worker.stop() == 0
        srv.stop()
    assert delivered(srv) == Counter({rcpt: 1})


def _attempts(worker: WorkerProcess, rcpt: str) -> int:
    rec = worker.record_for("job.bsmtp")
    if rec is None:
        return 0
    tries: int = next(
        r["attempts"] for t in rec["transactions"] for r in t["recipients"] if r["address"] == rcpt
    )
    return tries


@pytest.mark.parametrize(
    "limit",
    [
        {"delivery": {"max_connections": 3}},
        {"delivery": {"max_per_destination": 3}},
        {"spool": {"max_active": 3}},  # envelopes in flight: one connection each here
    ],
    ids=["max_connections", "max_per_destination", "max_active"],
)
def test_the_connection_limit_holds_across_processes(tmp_path: Path, limit: dict[str, Any]) -> None:
    gate = threading.Event()
    live, peak = [0], [0]
    sink = gated_sink(gate, live, peak)
    worker = supervised(tmp_path, sink.port, **limit).start()
    try:
        holding(worker, two_children(worker))  # both ready: each opens its share
        drop_burst(worker, 12)
        # every process has opened what its share allows, and waits on the gate
        wait_for(lambda: live[0] == 3, what="three connections")
        with pytest.raises(AssertionError):
            wait_for(lambda: live[0] > 3, timeout=1.0)
        gate.set()
        wait_for(lambda: all_final(worker, 12), what="12 envelopes done")
    finally:
        gate.set()
        assert worker.stop() == 0
        sink.stop()
    assert peak[0] == 3


def test_a_limit_below_the_processes_is_refused_naming_the_key(tmp_path: Path) -> None:
    worker = supervised(tmp_path, 9, delivery={"max_per_destination": 1})
    worker.start()
    assert worker.wait_exit() == 78
    assert "delivery.max_per_destination below worker.processes (2)" in worker.log.read_text()


def test_a_second_supervisor_is_refused_naming_the_first(tmp_path: Path) -> None:
    srv = SmtpServer()
    first = supervised(tmp_path, srv.port).start()
    try:
        second = supervised(tmp_path, srv.port)
        second.log = tmp_path / "second.log"
        second.start()
        assert second.wait_exit() == 75
        assert first.proc is not None
        assert f"in use by pid {first.proc.pid}" in second.log.read_text()
    finally:
        assert first.stop() == 0
        srv.stop()


def test_reload_and_shutdown_reach_every_process(tmp_path: Path) -> None:
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port).start()
    try:
        assert worker.proc is not None
        pids = {worker.proc.pid, *two_children(worker)}
        data = yaml.safe_load(worker.config.read_text())
        data["retry"] = {"interval": "7m"}
        worker.config.write_text(yaml.safe_dump(data))
        answer = worker.ask("RELOAD")
        assert answer["status"] == 200
        assert answer["result"]["changed"] == ["retry.interval"]
        assert answer["result"]["restart_needed"] == []

        def reloaded() -> set[int]:
            said = re.findall(rb"spoolsmtp\[(\d+)\] INFO (.*) reloaded\n", worker.log.read_bytes())
            return {int(pid) for pid, _ in said}

        # every process read it, and none thinks its share of the limits needs a restart
        wait_for(lambda: reloaded() == pids, what="three reloads")
        assert b"needs a restart" not in worker.log.read_bytes()
        assert worker.ask("SHUTDOWN")["status"] == 200
        assert worker.wait_exit() == 0
    finally:
        srv.stop()
    assert not any(alive(pid) for pid in pids)
    assert worker.log.read_text().count(" INFO stopped\n") == 3


def test_query_shows_what_the_processes_deliver_and_follow_their_trace(tmp_path: Path) -> None:
    gate = threading.Event()
    live, peak = [0], [0]
    sink = gated_sink(gate, live, peak)
    worker = supervised(tmp_path, sink.port).start()
    try:
        with connect(worker.operator_socket) as follower:
            assert exchange(follower, b"TRACE SPOOL").startswith(b"200 ")
            follower.sendall(b"FOLLOW\n")
            drop_burst(worker, 4)
            wait_for(lambda: live[0] == 4, what="four deliveries in flight")
            query = worker.ask("QUERY")["result"]
            assert query["states"]["active"] == 4
            assert [d["envelopes"] for d in query["destinations"].values()] == [4]
            assert worker.ask("STATS")["result"]["queue_active"] == 4
            seen = b""
            while seen.count(b": claimed as ") < 4:
                chunk = follower.recv(65536)
                assert chunk, seen
                seen += chunk
        envelope_id = re.search(rb"job0\.bsmtp: claimed as (\S+)", seen)
        assert envelope_id is not None
        # its record is written once it has been active for a moment (records.py)
        answer = wait_for(
            lambda: (a := worker.ask(f"QUERY {envelope_id[1].decode()}"))["status"] == 200 and a
        )
        assert answer["result"]["state"] == "active"
        gate.set()
        wait_for(lambda: all_final(worker, 4), what="4 envelopes done")
    finally:
        gate.set()
        assert worker.stop() == 0
        sink.stop()


def test_a_host_of_a_shared_spool_runs_its_processes_in_its_own_nodes(tmp_path: Path) -> None:
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port, worker={"processes": 2, "host_id": "mx1"}).start()
    try:
        rcpts = drop_burst(worker, 6)
        wait_for(lambda: all_final(worker, 6), what="6 envelopes done")
    finally:
        assert worker.stop() == 0
        srv.stop()
    assert delivered(srv) == Counter(rcpts)
    nodes = worker.spool / "nodes"
    assert sorted(p.name for p in nodes.iterdir()) == ["mx1", "mx1.1", "mx1.2", "mx1.supervisor"]
    assert (nodes / "mx1" / "control.sock").exists() is False  # removed at the stop
    assert not (worker.spool / "active").exists() and not (worker.spool / "journal").exists()


def _capabilities(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return -1


@needs_root
def test_processes_started_by_a_supervisor_that_dropped_root_keep_the_lease(
    open_dir: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as nobody, the delivery processes keep CAP_LEASE (and nothing else) across their
    exec, so a file of another user whose writer pauses past settle_seconds is not taken half
    written."""
    uid, gid = nobody()
    os.chown(sockdir, uid, gid)
    srv = SmtpServer()
    w = WorkerProcess(
        open_dir,
        {
            "user": "nobody",
            "smarthost": f"127.0.0.1:{srv.port}",
            "control": {"socket": str(sockdir / "control.sock")},
            "spool": {"settle_seconds": "200ms", "rescan_interval": "100ms"},
            "log_level": "debug",
            **TWO,
        },
        env={"PYTHONPATH": PLAIN_PATH},
    )
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", PLAIN_PYTHON)
        w.start()
    try:
        for pid in two_children(w):
            assert _capabilities(pid) == 1 << 28  # CAP_LEASE, nothing else
        write_with_a_pause(w)  # written by root: not the worker's own file
    finally:
        w.kill()
        srv.stop()
    assert sorted(m.rcpt_tos[0] for m in srv.messages) == ["a@example.org", "b@example.org"]


def test_an_envelope_in_a_process_says_where_its_file_is(tmp_path: Path) -> None:
    """An envelope a delivery process is delivering is in that process's own
    nodes/NAME/active/, and its record and QUERY ID say so: they said active/ID, a folder
    where the operator looking for it found nothing."""
    gate = threading.Event()
    srv = SmtpServer(Script(gate=gate))
    worker = supervised(tmp_path, srv.port).start()
    try:
        worker.drop_drafts("j.bsmtp", [draft("o@example.com", ["a@example.org"])])
        during = wait_for(lambda: worker.in_state("j.bsmtp", "active"), what="record while active")
        where = during["location"]
        assert re.fullmatch(rf"nodes/local\.[12]/active/{during['id']}\.bsmtp", where), where
        assert (worker.spool / where).is_file()
        answer = worker.ask(f"QUERY {during['id']}")
        assert answer["result"]["location"] == where, answer
        gate.set()
        after = wait_for(lambda: worker.final("j.bsmtp"), what="delivered")
        assert after["location"] == f"done/{during['id']}.bsmtp"
    finally:
        gate.set()
        assert worker.stop() == 0
        srv.stop()
