"""A supervisor (``worker.processes: 2``) and the operations of this round: DELETE, BOUNCE
and REBOOT answer for the whole; only the supervisor serves ``metrics.listen`` (the delivery
processes' counters summed) and speaks to systemd (its processes are started without
``$NOTIFY_SOCKET``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from spoolsmtp.app import wire
from spoolsmtp.app.supervisor import Supervisor
from spoolsmtp.control.port import Traffic
from spoolsmtp.model import config
from spoolsmtp.model.stats import Stats
from tests.helpers import draft
from tests.smtpservers import Script, SmtpServer
from tests.supervised import gated_sink, supervised, two_children
from tests.test_systemd import StandIn
from tests.workerproc import wait_for

LATER = "451 4.3.0 try later"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_delete_and_bounce_of_queued_envelopes_are_carried_out_for_the_whole(
    tmp_path: Path,
) -> None:
    srv = SmtpServer(Script(rcpt={"late@example.org": LATER}))
    worker = supervised(
        tmp_path, srv.port, retry={"interval": "1h"}, bounces={"requeue": False}
    ).start()
    try:
        worker.drop_drafts("a.bsmtp", [draft("oper@example.com", ["late@example.org"])])
        worker.drop_drafts("b.bsmtp", [draft("oper@example.com", ["late@example.org"])])
        a = wait_for(lambda: worker.in_state("a.bsmtp", "deferred"), what="a deferred")["id"]
        b = wait_for(lambda: worker.in_state("b.bsmtp", "deferred"), what="b deferred")["id"]
        deleted = worker.ask(f"DELETE {a}")
        assert deleted["status"] == 200, deleted
        bounced = worker.ask(f"BOUNCE {b}")
        assert bounced["status"] == 200, bounced
        assert worker.ask(f"DELETE {a}")["status"] == 404  # gone from the queue
        assert worker.ask("QUERY")["result"]["states"]["deferred"] == 0
        rec_a, rec_b = worker.final("a.bsmtp"), worker.final("b.bsmtp")
    finally:
        assert worker.stop() == 0
        srv.stop()
    assert rec_a is not None and rec_b is not None
    assert "deleted by the operator (uid 0)" in rec_a["reason"]
    assert "returned to the sender by the operator (uid 0)" in rec_b["reason"]
    assert not (worker.spool / "deferred" / f"{a}.bsmtp").exists()
    assert (worker.spool / "done" / f"{b}.bsmtp").exists()
    reports = [p.name for p in (worker.spool / "bounces").iterdir()]
    assert [n for n in reports if n.startswith(b)] and not [n for n in reports if n.startswith(a)]


def test_only_the_supervisor_serves_metrics_and_speaks_to_systemd(tmp_path: Path) -> None:
    srv = SmtpServer()
    port = _free_port()
    notify = StandIn()
    worker = supervised(
        tmp_path,
        srv.port,
        env={"NOTIFY_SOCKET": notify.env},
        metrics={"listen": f"127.0.0.1:{port}"},
    ).start()
    try:
        two_children(worker)
        for i in range(6):
            worker.drop_drafts(f"j{i}.bsmtp", [draft("oper@example.com", [f"u{i}@example.org"])])
        wait_for(lambda: all(worker.final(f"j{i}.bsmtp") for i in range(6)), what="delivered")
        wait_for(lambda: notify.said("READY=1"), what="READY=1")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        assert worker.stop() == 0
        srv.stop()
        notify.close()
    sent = {
        sample.labels.get("status"): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "spoolsmtp_recipients_total" and sample.labels.get("dsn_class") == "2"
    }
    assert sent.get("sent") == 6  # the delivery processes' counters, summed
    # one READY=1 and one STOPPING=1: the delivery processes (which run the same worker
    # code) said nothing, so systemd's view is the supervisor's alone
    assert len(notify.said("READY=1")) == 1
    assert len(notify.said("STOPPING=1")) == 1


def test_reboot_re_executes_the_supervisor_and_its_processes(tmp_path: Path) -> None:
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port).start()
    assert worker.proc is not None
    try:
        before = two_children(worker)
        answer = worker.ask("REBOOT")
        assert answer["status"] == 200, answer
        wait_for(
            lambda: worker.readies() == 2 and worker.answers(),
            what="the re-executed supervisor",
        )
        after = two_children(worker)
        assert set(after).isdisjoint(before)  # new delivery processes, same supervisor pid
        assert worker.proc.poll() is None
        worker.drop_drafts("after.bsmtp", [draft("oper@example.com", ["x@example.org"])])
        wait_for(lambda: worker.final("after.bsmtp"), what="delivered after REBOOT")
    finally:
        assert worker.stop() == 0
        srv.stop()


def test_reload_under_a_supervisor_refuses_what_a_worker_refuses(tmp_path: Path) -> None:
    """A logins file others may read: a worker's RELOAD refuses it (test_smtp_auth.py); so
    must the supervisor's, before any delivery process is told (found by review: it said
    "reloaded" and ran the new config while its processes kept the old one)."""
    srv = SmtpServer()
    auth = tmp_path / "logins.yaml"
    auth.write_text('relay: {username: batch, password: "secret"}\n')
    auth.chmod(0o600)
    route = {"host": "127.0.0.1", "port": srv.port, "auth": "relay", "auth_plaintext": True}
    worker = supervised(
        tmp_path, srv.port, smarthost=route, delivery={"auth_file": str(auth)}
    ).start()
    try:
        auth.chmod(0o644)
        answer = worker.ask("RELOAD")
        assert answer["status"] == 500, answer
        assert "delivery.auth_file" in json.dumps(answer)
        auth.chmod(0o600)
        assert worker.ask("RELOAD")["status"] == 200
    finally:
        assert worker.stop() == 0
        srv.stop()


def test_counters_never_go_back_when_a_delivery_process_dies(tmp_path: Path) -> None:
    """Prometheus reads a counter that falls as a reset: a delivery process killed and started
    again must not take its counts with it (found by review)."""
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port).start()
    try:
        before = two_children(worker)
        for i in range(6):
            worker.drop_drafts(f"j{i}.bsmtp", [draft("oper@example.com", [f"u{i}@example.org"])])
        wait_for(lambda: all(worker.final(f"j{i}.bsmtp") for i in range(6)), what="delivered")
        assert worker.ask("STATS")["result"]["recipients_delivered"] == 6
        os.kill(before[0], signal.SIGKILL)
        wait_for(lambda: before[0] not in two_children(worker), what="a new delivery process")
        assert worker.ask("STATS")["result"]["recipients_delivered"] == 6
    finally:
        assert worker.stop() == 0
        srv.stop()


def test_queue_lists_what_the_delivery_processes_are_delivering(tmp_path: Path) -> None:
    """`spoolsmtp queue` reads every node's active/, not only the plain one (found by
    review: mail in flight under a supervisor or on a shared spool was not listed)."""
    gate = threading.Event()
    live, peak = [0], [0]
    sink = gated_sink(gate, live, peak)
    worker = supervised(tmp_path, sink.port).start()
    try:
        worker.drop_drafts("held.bsmtp", [draft("oper@example.com", ["x@example.org"])])
        wait_for(lambda: live[0] == 1 and sink.received, what="DATA held at the sink")
        listed = subprocess.run(
            [sys.executable, "-m", "spoolsmtp", "queue", "--json", "--config", str(worker.config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(r["queue_name"], r["recipients"][0]["address"]) for r in rows] == [
            ("active", "x@example.org")
        ]
    finally:
        gate.set()
        assert worker.stop() == 0
        sink.stop()


def test_what_a_dead_process_last_told_stays_counted(tmp_path: Path) -> None:
    """A delivery process tells its counters every second when they move (wire ``c``), not
    only when STATS or METRICS asks: when it dies, what it last told stays counted, traffic
    included (an operator trial lost what was counted after the last question; the bytes
    sent of a dead process fell out of METRICS altogether)."""
    cfg = config.parse(
        yaml.safe_dump({"spool": {"path": str(tmp_path / "spool")}, "worker": {"processes": 2}}),
        str(tmp_path / "conf.yaml"),
    )
    told = Stats(files_taken=4, delivered=7)

    async def main() -> tuple[Stats, Traffic]:
        sup = Supervisor(cfg)
        sup.spool.ensure()
        child = sup.children[0]
        sup._report(child, {"c": [{"stats": wire.counters(told), "traffic": {"bytes_sent": 900}}]})
        sup._lost(child)
        await asyncio.gather(*sup._tasks)
        return sup.port.stats, sup.port.traffic()

    stats, traffic = asyncio.run(main())
    assert (stats.files_taken, stats.delivered) == (4, 7)
    assert traffic.bytes_sent == 900


def test_a_process_that_does_not_answer_is_named_once(tmp_path: Path) -> None:
    """A delivery process stopped (SIGSTOP) does not answer the snapshot each command asks
    for: the command is still answered (after the snapshot's timeout), and the log names the
    process once for the whole episode, and once when it answers again (an operator trial saw
    every command take 5.6 s and nothing said why)."""
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port).start()
    try:
        kids = two_children(worker)
        os.kill(kids[0], signal.SIGSTOP)
        try:
            assert worker.ask("STATS")["status"] == 200
            assert worker.ask("QUERY")["status"] == 200
        finally:
            os.kill(kids[0], signal.SIGCONT)
        assert worker.ask("STATS")["status"] == 200
    finally:
        assert worker.stop() == 0
        srv.stop()
    log = worker.log.read_text()
    assert log.count(f"(pid {kids[0]}) did not answer within") == 1, log
    assert log.count("answers again") == 1, log
