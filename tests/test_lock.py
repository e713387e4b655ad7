"""One worker per spool: a second ``spoolsmtp run`` on the same spool is refused, with real
processes; a lock left by a worker killed with SIGKILL does not block the next one."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.model import exitcodes
from spoolsmtp.spool.folders import FOLDERS
from spoolsmtp.spool.lock import holder
from tests.helpers import draft
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import WorkerProcess, wait_for


def second(
    tmp_path: Path, first: WorkerProcess, settings: dict[str, Any], *, own_path: bool = False
) -> WorkerProcess:
    """A worker with its own folder, config and control socket, on the first one's spool;
    ``own_path``: a spool.path of its own, with every folder pointed at the first one's."""
    root = tmp_path / "second"
    root.mkdir(exist_ok=True)
    spool: dict[str, Any] = {"path": str(first.spool), "settle_seconds": "300ms"}
    if own_path:
        spool["path"] = str(root / "spool")
        spool.update({str(name): str(first.spool / name) for name in FOLDERS})
    return WorkerProcess(
        root,
        {**settings, "spool": spool, "control": {"socket": str(root / "control.sock")}},
    )


def holder_of(folder: Path) -> str:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return holder(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("own_path", [False, True], ids=["same-config-path", "same-folders"])
def test_a_second_worker_on_the_same_spool_is_refused_and_delivers_nothing(
    tmp_path: Path, own_path: bool
) -> None:
    gate = threading.Event()
    srv = SmtpServer(Script(gate=gate))
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    first = WorkerProcess(tmp_path, settings).start()
    try:
        first.drop_drafts("job.bsmtp", [draft("o@example.com", ["a@example.org"])])
        wait_for(lambda: first.files("active"), what="envelope in flight")
        other = second(tmp_path, first, settings, own_path=own_path)
        try:
            assert other.start().wait_exit(timeout=10) == exitcodes.TEMPFAIL
        finally:
            other.kill()
        assert first.proc is not None
        lines = other.log.read_text().strip().splitlines()
        assert len(lines) == 1, lines
        assert f"pid {first.proc.pid}" in lines[0] and str(first.spool / "active") in lines[0]
        gate.set()
        rec = wait_for(lambda: first.final("job.bsmtp"), what="delivered by the first")
    finally:
        gate.set()
        assert first.stop() == 0
        srv.stop()
    assert rec["state"] == "done"
    assert [m.rcpt_tos for m in srv.messages] == [["a@example.org"]]


def test_a_lock_left_by_a_killed_worker_does_not_block_a_restart(tmp_path: Path) -> None:
    srv = SmtpServer()
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    try:
        first = WorkerProcess(tmp_path, settings).start()
        first.kill()
        again = second(tmp_path, first, settings).start()
        try:
            first.drop_drafts("job.bsmtp", [draft("o@example.com", ["a@example.org"])])
            rec = wait_for(lambda: first.final("job.bsmtp"), what="delivered after restart")
            assert again.proc is not None
            assert holder_of(first.spool / "active") == str(again.proc.pid)
        finally:
            assert again.stop() == 0
    finally:
        srv.stop()
    assert rec["state"] == "done"
    assert again.proc is not None
    assert holder_of(first.spool / "active") == ""  # released at the second one's exit


def test_a_worker_alone_started_beside_a_supervisor_is_refused_as_in_use(tmp_path: Path) -> None:
    """worker.processes: 1 on the spool and socket a supervisor runs on: it takes no node of
    the supervisor's, so its control socket is what tells; exit 75 naming the supervisor's
    pid, as for a spool in use (an operator trial saw 78, a configuration error, which the
    systemd unit does not restart on)."""
    srv = SmtpServer()
    settings: dict[str, Any] = {"smarthost": f"127.0.0.1:{srv.port}"}
    first = WorkerProcess(tmp_path, {**settings, "worker": {"processes": 2}}).start()
    try:
        (tmp_path / "alone").mkdir()
        alone = WorkerProcess(tmp_path / "alone", {**settings, "spool": {"path": str(first.spool)}})
        alone.config.write_text(first.config.read_text().replace("processes: 2", "processes: 1"))
        try:
            assert alone.start().wait_exit(timeout=20) == exitcodes.TEMPFAIL
        finally:
            alone.kill()
        assert first.proc is not None
        text = alone.log.read_text()
        assert f"pid {first.proc.pid}" in text and "config error" not in text, text
    finally:
        assert first.stop() == 0
        srv.stop()
