"""The operator commands beyond the basic set, against a running worker: HOLD and RELEASE by
destination and for all, DELETE (with and without a report), BOUNCE, REBOOT, a bare TRACE,
EXIT; each in text and JSON, and each refused to a real unprivileged uid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import draft, report_failures, statuses
from tests.hostile import cli_as_nobody, needs_root
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import ROOT, WorkerProcess, connect, exchange, wait_for

LATER = "451 4.3.0 try later"


@pytest.fixture
def two() -> Iterator[tuple[SmtpServer, SmtpServer]]:
    """Two destinations that defer everything (one server each, so two destination keys)."""
    a = SmtpServer(Script(rcpt={f"u{i}@a.example": LATER for i in range(4)}))
    b = SmtpServer(Script(rcpt={f"u{i}@b.example": LATER for i in range(4)}))
    yield a, b
    a.stop()
    b.stop()


def _worker(root: Path, a: SmtpServer, b: SmtpServer, sock: Path | None = None) -> WorkerProcess:
    control = {"socket": str(sock)} if sock else {}
    return WorkerProcess(
        root,
        {
            "routes": {"a.example": f"127.0.0.1:{a.port}", "b.example": f"127.0.0.1:{b.port}"},
            "retry": {"interval": "1h", "warning_age": "0s"},
            "bounces": {"requeue": False},
            "control": control,
        },
    ).start()


def _deferred(w: WorkerProcess, name: str, rcpts: list[str]) -> str:
    w.drop_drafts(name, [draft("sender@origin.example", rcpts)])
    rec = wait_for(lambda: w.in_state(name, "deferred"), what=f"{name} deferred")
    return str(rec["id"])


def _ctl(w: WorkerProcess, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoolsmtp", "ctl", "--socket", str(w.operator_socket), *words],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_hold_and_release_by_destination_and_for_all(
    tmp_path: Path, two: tuple[SmtpServer, SmtpServer]
) -> None:
    w = _worker(tmp_path, *two)
    try:
        ida = _deferred(w, "a.bsmtp", ["u0@a.example"])
        idb = _deferred(w, "b.bsmtp", ["u0@b.example"])
        held = w.ask("HOLD DEST a.example")
        assert held["status"] == 200 and held["result"]["envelopes"] == [ida]
        assert [p.name for p in w.files("hold")] == [f"{ida}.bsmtp"]
        assert [p.name for p in w.files("deferred")] == [f"{idb}.bsmtp"]
        assert w.in_state("a.bsmtp", "held") and w.in_state("b.bsmtp", "deferred")
        assert w.ask("RELEASE DEST b.example")["result"]["envelopes"] == []  # none held there
        text = _ctl(w, "HOLD", "*")
        assert text.returncode == 0 and f"{idb} held" in text.stdout
        assert sorted(p.name for p in w.files("hold")) == sorted([f"{ida}.bsmtp", f"{idb}.bsmtp"])
        assert w.ask("RELEASE DEST a.example")["result"]["envelopes"] == [ida]
        wait_for(lambda: w.in_state("a.bsmtp", "deferred"), what="a released")
        assert w.ask("RELEASE ALL")["result"]["envelopes"] == [idb]
        wait_for(lambda: w.in_state("b.bsmtp", "deferred"), what="b released")
        assert w.ask("HOLD DEST not_a_domain!")["status"] == 400
    finally:
        w.stop()


def test_delete_drops_the_envelope_and_keeps_a_final_record(
    tmp_path: Path, two: tuple[SmtpServer, SmtpServer]
) -> None:
    a, _ = two
    a.script.rcpt.pop("u1@a.example")  # u1 is delivered, u0 deferred
    w = _worker(tmp_path, *two)
    try:
        env_id = _deferred(w, "d.bsmtp", ["u0@a.example", "u1@a.example"])
        done = _ctl(w, "DELETE", env_id)
        assert done.returncode == 0, done.stderr
        assert f"{env_id} deleted" in done.stdout
        rec = w.final("d.bsmtp")
        assert rec is not None and rec["state"] == "done"
        assert "deleted by the operator (uid 0)" in rec["reason"]
        assert statuses(rec) == {"u0@a.example": "failed", "u1@a.example": "delivered"}
        (u0,) = [r for r in rec["transactions"][0]["recipients"] if r["address"] == "u0@a.example"]
        assert "deleted by the operator (uid 0)" in u0["reply"]["text"]
        assert u0["decided_locally"] is True
        for folder in ("active", "deferred", "hold", "done", "bounces", "incoming"):
            assert w.files(folder) == [], folder  # the file gone, no report written
        assert "removed by the operator (uid 0)" in w.log.read_text()
        assert w.ask(f"QUERY {env_id}")["result"]["state"] == "done"
        assert w.ask(f"DELETE {env_id}")["status"] == 404  # no longer queued
    finally:
        w.stop()


def test_delete_with_report_and_bounce_tell_the_sender(
    tmp_path: Path, two: tuple[SmtpServer, SmtpServer]
) -> None:
    w = _worker(tmp_path, *two)
    try:
        deleted = _deferred(w, "r.bsmtp", ["u0@a.example", "u1@a.example"])
        bounced = _deferred(w, "b.bsmtp", ["u2@a.example", "u0@b.example"])
        answer = w.ask(f"DELETE {deleted} REPORT")
        assert answer["status"] == 200 and answer["result"]["report"] is True
        answer = w.ask(f"BOUNCE {bounced}")
        assert answer["status"] == 200 and answer["result"]["bounced"] is True
        reports = {p.name.split(".")[0]: p for p in w.files("bounces")}
        assert set(reports) == {deleted, bounced}
        assert report_failures(reports[deleted])[1] == {"u0@a.example", "u1@a.example"}
        assert report_failures(reports[bounced])[1] == {"u2@a.example", "u0@b.example"}
        rec = w.final("b.bsmtp")
        assert rec is not None and "returned to the sender by the operator" in rec["reason"]
        assert rec["location"] == f"done/{bounced}.bsmtp"
        assert [p.name for p in w.files("done")] == [f"{bounced}.bsmtp"]
        assert set(statuses(rec).values()) == {"failed"}
        assert w.ask("QUERY")["result"]["states"]["deferred"] == 0
        assert w.ask("BOUNCE nonsense")["status"] == 400
        assert w.ask("DELETE 20260101-000000-000000-abcdef")["status"] == 404
    finally:
        w.stop()


def test_a_bare_trace_turns_session_tracing_on_as_on_vm(
    tmp_path: Path, two: tuple[SmtpServer, SmtpServer]
) -> None:
    w = _worker(tmp_path, *two)
    try:
        assert w.ask("TRACE STATUS")["result"]["tracing"] == []
        assert w.ask("TRACE")["result"]["tracing"] == ["session"]
        assert w.ask("TRACE STATUS")["result"]["tracing"] == ["session"]
        _deferred(w, "t.bsmtp", ["u0@a.example"])
        wait_for(lambda: "RCPT TO:<u0@a.example>" in w.log.read_text(), what="traced dialogue")
        assert w.ask("NOTRACE ALL")["result"]["tracing"] == []
    finally:
        w.stop()


def test_exit_ends_the_session_with_an_answer(
    tmp_path: Path, two: tuple[SmtpServer, SmtpServer]
) -> None:
    w = _worker(tmp_path, *two)
    try:
        done = _ctl(w, "EXIT")
        assert done.returncode == 0 and done.stdout.strip() == "bye", done.stderr
        with connect(w.operator_socket) as sock:
            assert json.loads(exchange(sock, b"JSON STATS"))["status"] == 200
            assert json.loads(exchange(sock, b"JSON QUIT")) == {
                "status": 200,
                "command": "QUIT",
                "result": {"bye": True},
            }
            assert sock.recv(100) == b""  # and then the worker closes the connection
    finally:
        w.stop()


def test_reboot_re_executes_with_the_new_config_and_takes_the_spool_again(
    tmp_path: Path, two: tuple[SmtpServer, SmtpServer]
) -> None:
    a, _ = two
    a.script.rcpt.pop("u3@a.example")
    w = _worker(tmp_path, *two)
    assert w.proc is not None
    try:
        held = _deferred(w, "h.bsmtp", ["u0@a.example"])
        data = yaml.safe_load(w.config.read_text())
        data["hostname"] = "rebooted.test"
        w.config.write_text(yaml.safe_dump(data))
        answer = w.ask("REBOOT")
        assert answer["status"] == 200 and answer["result"]["rebooting"] is True
        # the same process (execv keeps the pid) is ready again and answers on its sockets
        wait_for(
            lambda: w.log.read_text().count(" INFO ready\n") == 2 and w.answers(),
            what="the re-executed worker",
        )
        assert w.proc.poll() is None
        assert "re-executing" in w.log.read_text()
        # it holds the spool: a second worker is refused (75), as with any running worker
        second = subprocess.run(
            [sys.executable, "-m", "spoolsmtp", "run", "--config", str(w.config)],
            capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert second.returncode == 75, second.stderr
        # the queue came back, and the new config is in force (our EHLO name)
        assert w.ask(f"QUERY {held}")["result"]["state"] == "deferred"
        w.drop_drafts("n.bsmtp", [draft("sender@origin.example", ["u3@a.example"])])
        wait_for(lambda: w.final("n.bsmtp"), what="delivered after the reboot")
        assert b"EHLO rebooted.test" in a.wire
        assert w.stop() == 0
    finally:
        w.kill()


@needs_root
def test_an_unprivileged_uid_is_refused_every_new_command(
    tmp_path: Path, sockdir: Path, two: tuple[SmtpServer, SmtpServer]
) -> None:
    sock = sockdir / "control.sock"
    w = _worker(tmp_path, *two, sock=sock)
    try:
        env_id = _deferred(w, "n.bsmtp", ["u0@a.example"])
        for words in (
            [f"DELETE {env_id}"],
            [f"DELETE {env_id} REPORT"],
            [f"BOUNCE {env_id}"],
            ["HOLD DEST a.example"],
            ["HOLD *"],
            ["TRACE"],
            ["REBOOT"],
        ):
            code, out, _ = cli_as_nobody(["ctl", "--socket", str(sock), "--json", *words], tmp_path)
            assert code == 77, words
            assert json.loads(out)["status"] == 403, words
        code, out, _ = cli_as_nobody(["ctl", "--socket", str(sock), "EXIT"], tmp_path)
        assert code == 0 and out.strip() == b"bye"
        assert [p.name for p in w.files("deferred")] == [f"{env_id}.bsmtp"]
        assert w.ask("TRACE STATUS")["result"]["tracing"] == []
        assert w.proc is not None and w.proc.poll() is None
        assert w.log.read_text().count("not authorised") >= 1
    finally:
        w.stop()


def test_an_envelope_being_delivered_is_busy_until_its_attempt_ends(
    tmp_path: Path, two: tuple[SmtpServer, SmtpServer]
) -> None:
    a, _ = two
    a.script.gate = threading.Event()  # the server sits in DATA until the test lets it go
    w = _worker(tmp_path, *two)
    try:
        w.drop_drafts("g.bsmtp", [draft("sender@origin.example", ["x@a.example"])])
        active = wait_for(lambda: w.ask("QUERY")["result"]["states"]["active"], what="active")
        assert active == 1
        (env_id,) = [p.name.split(".")[0] for p in w.files("active")]
        busy = _ctl(w, "DELETE", env_id)
        assert busy.returncode == 75 and "being delivered now" in busy.stderr
        assert w.ask(f"BOUNCE {env_id}")["status"] == 409
        a.script.gate.set()
        wait_for(lambda: w.final("g.bsmtp"), what="delivered")  # the attempt went on
        assert w.ask(f"DELETE {env_id}")["status"] == 404
    finally:
        w.stop()
