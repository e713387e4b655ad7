"""Who the worker runs as and what it lets others do: a root-started worker becomes its
configured user, creates private files, refuses unsafe folders, and trusts the kernel's word
on a control peer's groups."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import draft
from tests.hostile import PLAIN_PYTHON, become_nobody, needs_root, nobody
from tests.smtpservers import SmtpServer
from tests.test_intake import write_with_a_pause
from tests.workerproc import ROOT, WorkerProcess, ask, ctl, wait_for

# the worker that drops to nobody runs on the system's python3 with this checkout's dependencies
PLAIN_PATH = f"{ROOT}:{site.getsitepackages()[0]}"


def _status(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


@pytest.fixture
def as_nobody(
    open_dir: Path,
    sockdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[WorkerProcess, SmtpServer, Path]]:
    uid, gid = nobody()
    os.chown(sockdir, uid, gid)
    srv = SmtpServer()
    sock = sockdir / "control.sock"
    w = WorkerProcess(
        open_dir,
        {
            "user": "nobody",
            "smarthost": f"127.0.0.1:{srv.port}",
            "control": {"socket": str(sock)},
        },
        env={"PYTHONPATH": PLAIN_PATH},
    )
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", PLAIN_PYTHON)
        w.start()
    yield w, srv, sock
    w.kill()
    srv.stop()


@needs_root
def test_a_root_started_worker_runs_as_its_user_and_still_delivers(
    as_nobody: tuple[WorkerProcess, SmtpServer, Path],
) -> None:
    w, srv, sock = as_nobody
    uid, gid = nobody()
    assert w.proc is not None
    ids = _status(w.proc.pid)
    assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [gid] * 4, ids
    assert set(ids["Groups"]) <= set(os.getgrouplist("nobody", gid)), ids
    w.drop_drafts("p.bsmtp", [draft("o@example.com", ["a@example.org"])])
    rec = wait_for(lambda: w.final("p.bsmtp"))
    assert rec["transactions"][0]["recipients"][0]["status"] == "delivered"
    assert [m.rcpt_tos for m in srv.messages] == [["a@example.org"]]
    result = w.spool / "results" / f"{rec['id']}.json"
    assert result.stat().st_uid == uid and (result.stat().st_mode & 0o777) == 0o600
    for name in ("active", "done", "results", "journal", "deferred"):
        info = (w.spool / name).stat()
        assert info.st_uid == uid and (info.st_mode & 0o777) == 0o700, name
    assert sock.stat().st_uid == uid
    stats = ctl(w.config, "STATS")
    assert stats.returncode == 0 and "recipients_delivered" in stats.stdout, stats.stderr
    assert ask(sock, "STATS")["result"]["recipients_delivered"] == 1
    assert "Traceback" not in w.log.read_text()


def _refused(w: WorkerProcess) -> str:
    w.start()
    try:
        assert w.wait_exit() == 78
    finally:
        w.kill()
    text = w.log.read_text()
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    return text


@pytest.mark.parametrize(
    ("folder", "mode", "refused"),
    [
        ("active", 0o777, "writable by group or others"),
        ("active", 0o1777, "writable by group or others"),
        ("results", 0o770, "writable by group or others"),
        ("incoming", 0o777, "not sticky"),
        ("incoming", 0o1733, None),
    ],
)
def test_unsafe_folder_modes_are_refused_at_start(
    tmp_path: Path,
    sockdir: Path,
    folder: str,
    mode: int,
    refused: str | None,
) -> None:
    w = WorkerProcess(tmp_path, {"control": {"socket": str(sockdir / "control.sock")}})
    (w.spool / folder).mkdir(parents=True, exist_ok=True)
    (w.spool / folder).chmod(mode)
    if refused is None:
        w.start()
        try:
            assert w.proc is not None and w.proc.poll() is None
            assert ask(sockdir / "control.sock", "STATS")["status"] == 200
        finally:
            w.kill()
        return
    text = _refused(w)
    assert f"spool.{folder}: refusing {w.spool / folder}" in text and refused in text


@needs_root
def test_a_folder_owned_by_another_user_is_refused(
    tmp_path: Path,
    sockdir: Path,
) -> None:
    w = WorkerProcess(tmp_path, {"control": {"socket": str(sockdir / "control.sock")}})
    (w.spool / "deferred").mkdir(parents=True)
    os.chown(w.spool / "deferred", *nobody())
    text = _refused(w)
    assert "spool.deferred" in text and f"belongs to uid {nobody()[0]}" in text


def test_files_the_worker_creates_are_private(
    tmp_path: Path,
    sockdir: Path,
) -> None:
    srv = SmtpServer()
    w = WorkerProcess(
        tmp_path,
        {"smarthost": f"127.0.0.1:{srv.port}", "control": {"socket": str(sockdir / "c.sock")}},
    ).start()
    try:
        w.drop_drafts("f.bsmtp", [draft("o@example.com", ["a@example.org"])])
        rec = wait_for(lambda: w.final("f.bsmtp"))
    finally:
        w.kill()
        srv.stop()
    assert ((w.spool / "results" / f"{rec['id']}.json").stat().st_mode & 0o777) == 0o600
    assert (w.spool.stat().st_mode & 0o777) == 0o755
    for name in ("active", "deferred", "hold", "done", "results", "journal", "operator"):
        assert ((w.spool / name).stat().st_mode & 0o777) == 0o700, name


_ASK = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sys.argv[1])
    s.sendall(b"JSON TRACE SPOOL\\n")
    print(s.makefile().readline(), end="")
    """
)


@needs_root
@pytest.mark.parametrize(("groups", "status"), [([4242], 200), ([4243], 403), ([], 403)])
def test_a_peer_is_authorised_by_the_groups_the_kernel_reports(
    tmp_path: Path,
    sockdir: Path,
    groups: list[int],
    status: int,
) -> None:

    sock = sockdir / "control.sock"
    # gid 4242 is in no group file: only the peer's real groups can tell
    w = WorkerProcess(
        tmp_path, {"control": {"socket": str(sock), "authorized_groups": ["4242"]}}
    ).start()
    try:
        done = subprocess.run(
            [PLAIN_PYTHON, "-c", _ASK, str(sock)],
            preexec_fn=lambda: become_nobody(groups),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        w.kill()
    assert json.loads(done.stdout)["status"] == status, done.stderr


@needs_root
def test_a_worker_that_dropped_root_still_never_takes_a_file_open_for_writing(
    open_dir: Path,
    sockdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run as nobody, the worker keeps CAP_LEASE (and nothing else of root's), so a file of
    another user whose writer pauses past settle_seconds is still not taken half written."""
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
        },
        env={"PYTHONPATH": PLAIN_PATH},
    )
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", PLAIN_PYTHON)
        w.start()
    try:
        assert w.proc is not None
        assert _capabilities(w.proc.pid) == 1 << 28  # CAP_LEASE, nothing else
        write_with_a_pause(w)  # written by root: not the worker's own file
    finally:
        w.kill()
        srv.stop()
    assert sorted(m.rcpt_tos[0] for m in srv.messages) == ["a@example.org", "b@example.org"]


def _capabilities(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return -1


@needs_root
def test_a_spool_run_by_root_can_be_handed_to_a_dedicated_user(
    open_dir: Path,
    sockdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that ran as root and was killed leaves root's dead socket and root's 0700
    operators' folder; started next with ``user: nobody`` it hands both over and runs."""
    uid, gid = nobody()
    srv = SmtpServer()
    settings = {
        "smarthost": f"127.0.0.1:{srv.port}",
        "control": {"socket": str(sockdir / "control.sock")},
    }
    try:
        as_root = WorkerProcess(open_dir, settings).start()
        wait_for((as_root.spool / "operator" / "control.sock").exists)
        as_root.kill()
        os.chown(sockdir, uid, gid)  # the public socket's folder, as the operator would
        operators = as_root.spool / "operator"
        assert (
            operators.stat().st_uid == 0 and (as_root.spool / "operator" / "control.sock").exists()
        )
        w = WorkerProcess(open_dir, {**settings, "user": "nobody"}, env={"PYTHONPATH": PLAIN_PATH})
        with monkeypatch.context() as patch:
            patch.setattr(sys, "executable", PLAIN_PYTHON)
            w.start()
        try:
            w.drop_drafts("h.bsmtp", [draft("o@example.com", ["a@example.org"])])
            rec = wait_for(lambda: w.final("h.bsmtp"))
            assert operators.stat().st_uid == uid
            assert ctl(w.config, "STATS").returncode == 0
        finally:
            w.kill()
    finally:
        srv.stop()
    assert rec["transactions"][0]["recipients"][0]["status"] == "delivered"
