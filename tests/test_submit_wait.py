"""``submit --wait`` never says delivered for a message that was not, and works for a user who
cannot read the worker's result records."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp import cli
from spoolsmtp.submit import outcome
from tests.hostile import needs_root, nobody, reachable_by_others
from tests.smtpservers import Script, SmtpServer
from tests.test_submit import run, spoolsmtp
from tests.workerproc import WorkerProcess


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


def _as_nobody(argv: list[str], stdin: bytes, base: Path) -> tuple[int, bytes, bytes]:
    """``spoolsmtp ARGV`` in a child process running as uid nobody: exit code, out, err."""
    files = {name: base / f"nobody.{name}" for name in ("in", "out", "err")}
    files["in"].write_bytes(stdin)
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run the command, report its exit code
        code = 70
        try:
            for fd, name, mode in ((0, "in", os.O_RDONLY), (1, "out", os.O_WRONLY | os.O_CREAT)):
                os.dup2(os.open(files[name], mode, 0o600), fd)
            os.dup2(os.open(files["err"], os.O_WRONLY | os.O_CREAT, 0o600), 2)
            sys.stdin = open(0, closefd=False)  # noqa: SIM115 - pytest's stand-ins, replaced
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            uid, gid = nobody()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), files["out"].read_bytes(), files["err"].read_bytes()


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A folder outside pytest's 0700 tmp tree, so that nobody can reach what it is meant to."""
    base = Path(tempfile.mkdtemp(prefix="spoolsmtp-wait-"))
    reachable_by_others(base)
    yield base
    for path in sorted(base.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    base.rmdir()


@needs_root
@pytest.mark.parametrize(
    ("rcpt", "code", "status"), [("alice", 0, "delivered"), ("gone", 67, "failed")]
)
def test_wait_as_another_user_learns_the_outcome_from_the_control_socket(
    open_base: Path, server: SmtpServer, rcpt: str, code: int, status: str
) -> None:
    w = WorkerProcess(open_base, {"smarthost": f"127.0.0.1:{server.port}"}).start()
    try:
        (w.spool / "incoming").chmod(0o1777)
        open_base.chmod(0o755)
        w.config.chmod(0o644)
        out_code, out, err = _as_nobody(
            ["submit", "--config", str(w.config), "--wait=30", "--json", f"{rcpt}@example.org"],
            b"Subject: s\n\nx\n",
            open_base,
        )
        records = list((w.spool / "results").glob("*.json"))
        assert records and all(p.stat().st_mode & 0o004 == 0 for p in records)
    finally:
        w.stop()
    assert out_code == code, err
    record = json.loads(out)
    assert record["transactions"][0]["recipients"][0]["status"] == status


@needs_root
def test_wait_that_cannot_learn_the_outcome_says_so_and_exits_75(open_base: Path) -> None:
    spool = open_base / "spool"
    (spool / "incoming").mkdir(parents=True)
    (spool / "incoming").chmod(0o1777)
    (spool / "results").mkdir(mode=0o700)
    conf = open_base / "conf.yaml"
    conf.write_text(f"hostname: h.test\nspool:\n  path: {spool}\n")
    conf.chmod(0o644)
    open_base.chmod(0o755)
    code, out, err = _as_nobody(
        ["submit", "--config", str(conf), "--wait=1", "a@example.org"], b"x\n", open_base
    )
    assert code == 75, err
    (queued,) = list((spool / "incoming").iterdir())
    assert out.decode().split()[0] == queued.name.removesuffix(".bsmtp")
    lines = err.decode().splitlines()
    assert len(lines) == 1 and "cannot learn the outcome" in lines[0], lines
    assert "Traceback" not in err.decode()
