"""``submit --wait`` never says delivered for a message that was not, and works for a user who
cannot read the worker's result records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.app.submit import outcome
from tests.hostile import cli_as_nobody, needs_root
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import WorkerProcess, run, spoolsmtp


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    yield srv
    srv.stop()


def _submit_wait(w: WorkerProcess, *rcpts: str, message: bytes) -> tuple[int, dict[str, Any]]:
    done = run(
        spoolsmtp("submit", "--config", str(w.config), "--wait=30", "--json", *rcpts),
        w.root,
        message,
    )
    record: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, record


def test_a_message_the_worker_refused_is_65_not_delivered(
    tmp_path: Path, server: SmtpServer
) -> None:
    settings = {"smarthost": f"127.0.0.1:{server.port}", "limits": {"max_message_bytes": 300}}
    w = WorkerProcess(tmp_path, settings).start()
    try:
        code, record = _submit_wait(
            w, "alice@example.org", message=b"Subject: big\n\n" + (b"x" * 60 + b"\n") * 10
        )
    finally:
        w.stop()
    assert record["state"] == "done" and record["transactions"] == []
    assert code == 65
    assert server.messages == []


def test_a_refused_recipient_is_67_even_when_the_others_were_delivered(
    tmp_path: Path, server: SmtpServer
) -> None:
    settings = {"smarthost": f"127.0.0.1:{server.port}", "limits": {"recipients": 1}}
    w = WorkerProcess(tmp_path, settings).start()
    try:
        code, record = _submit_wait(
            w, "alice@example.org", "bob@example.org", message=b"Subject: s\n\nx\n"
        )
    finally:
        w.stop()
    assert record["batch_errors"], record
    assert code == 67


@pytest.mark.parametrize(
    ("record", "code"),
    [
        ({"state": "rejected", "transactions": [], "reason": "x:1: binary content"}, 65),
        (
            {
                "state": "rejected",
                "reason": "quarantined",
                "transactions": [{"recipients": [{"status": "failed"}, {"status": "delivered"}]}],
            },
            67,
        ),
        ({"state": "done", "transactions": [{"recipients": [{"status": "delivered"}]}]}, 0),
        ({"state": "done", "transactions": [{"recipients": []}]}, 65),
        ({"state": "deferred", "transactions": [{"recipients": [{"status": "deferred"}]}]}, None),
    ],
)
def test_what_a_final_record_means(record: dict[str, Any], code: int | None) -> None:
    assert outcome(record) == code


@needs_root
@pytest.mark.parametrize(
    ("rcpt", "code", "status"), [("alice", 0, "delivered"), ("gone", 67, "failed")]
)
def test_wait_as_another_user_learns_the_outcome_from_the_control_socket(
    open_dir: Path, server: SmtpServer, rcpt: str, code: int, status: str
) -> None:
    w = WorkerProcess(open_dir, {"smarthost": f"127.0.0.1:{server.port}"}).start()
    try:
        (w.spool / "incoming").chmod(0o1777)
        open_dir.chmod(0o755)
        w.config.chmod(0o644)
        out_code, out, err = cli_as_nobody(
            ["submit", "--config", str(w.config), "--wait=30", "--json", f"{rcpt}@example.org"],
            open_dir,
            b"Subject: s\n\nx\n",
        )
        records = list((w.spool / "results").glob("*.json"))
        assert records and all(p.stat().st_mode & 0o004 == 0 for p in records)
    finally:
        w.stop()
    assert out_code == code, err
    record = json.loads(out)
    assert record["transactions"][0]["recipients"][0]["status"] == status


@needs_root
def test_wait_that_cannot_learn_the_outcome_says_so_and_exits_75(open_dir: Path) -> None:
    spool = open_dir / "spool"
    (spool / "incoming").mkdir(parents=True)
    (spool / "incoming").chmod(0o1777)
    (spool / "results").mkdir(mode=0o700)
    conf = open_dir / "conf.yaml"
    conf.write_text(f"hostname: h.test\nspool:\n  path: {spool}\n")
    conf.chmod(0o644)
    open_dir.chmod(0o755)
    code, out, err = cli_as_nobody(
        ["submit", "--config", str(conf), "--wait=1", "a@example.org"], open_dir, b"x\n"
    )
    assert code == 75, err
    (queued,) = list((spool / "incoming").iterdir())
    assert out.decode().split()[0] == queued.name.removesuffix(".bsmtp")
    lines = err.decode().splitlines()
    assert len(lines) == 1 and "cannot learn the outcome" in lines[0], lines
    assert "Traceback" not in err.decode()
