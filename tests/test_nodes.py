"""Node areas: where a node's own folders are, which nodes a spool has, and the lock that says a
node is alive (held by a real other process, released by a real SIGKILL)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spoolsmtp.model import config, exitcodes
from spoolsmtp.model.config import SpoolConfig
from spoolsmtp.spool import nodes
from spoolsmtp.spool.folders import Spool
from spoolsmtp.spool.lock import SpoolBusy
from tests.helpers import draft
from tests.smtpservers import SmtpServer
from tests.workerproc import ROOT, WorkerProcess, wait_for

_HOLD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from spoolsmtp.model.config import SpoolConfig
    from spoolsmtp.spool import nodes
    nodes.lock(SpoolConfig(path=Path(sys.argv[1])), sys.argv[2]).acquire()
    print("held", flush=True)
    sys.stdin.read()
    """
)


@contextmanager
def held_elsewhere(spool: Path, node: str) -> Iterator[subprocess.Popen[str]]:
    """Node ``node``'s lock, held by another process until the block ends."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(spool), node],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "held\n"
            yield proc
        finally:
            proc.kill()
            proc.wait(10)


def test_the_default_node_keeps_the_spools_own_folders_and_a_named_one_has_its_area(
    tmp_path: Path,
) -> None:
    cfg = SpoolConfig(path=tmp_path, journal=tmp_path / "elsewhere")
    plain, named = Spool(cfg), Spool(cfg, node="a")
    assert plain.dirs["active"] == tmp_path / "active"
    assert plain.dirs["journal"] == tmp_path / "elsewhere"
    assert named.dirs["active"] == tmp_path / "nodes" / "a" / "active"
    assert named.dirs["journal"] == tmp_path / "nodes" / "a" / "journal"
    shared = [name for name in plain.dirs if name not in ("active", "journal")]
    assert all(named.dirs[name] == plain.dirs[name] for name in shared)
    with pytest.raises(ValueError):
        nodes.area(cfg, "../x")


def test_the_nodes_present_are_the_default_area_and_each_named_one(tmp_path: Path) -> None:
    cfg = SpoolConfig(path=tmp_path)
    assert nodes.present(cfg) == []
    Spool(cfg, node="b").ensure()
    Spool(cfg, node="a").ensure()
    (tmp_path / "nodes" / "not a node").mkdir()
    (tmp_path / "nodes" / "file").write_text("")
    assert nodes.present(cfg) == ["a", "b"], "a named node has no default area made"
    Spool(cfg).ensure()
    assert nodes.present(cfg) == ["", "a", "b"]


def test_the_default_control_sockets_of_a_host_are_in_its_node_area() -> None:
    alone = config.parse("spool: {path: /s}\n")
    host = config.parse("spool: {path: /s}\nworker: {host_id: h1}\n")
    assert alone.control_socket == Path("/s/control.sock")
    assert host.control_socket == Path("/s/nodes/h1/control.sock")
    assert host.operator_socket == Path("/s/nodes/h1/operator/control.sock")
    chosen = config.parse("worker: {host_id: h1}\ncontrol: {socket: /run/c.sock}\n")
    assert chosen.control_socket == Path("/run/c.sock")


@pytest.mark.parametrize("node", ["", "a"])
def test_a_node_is_alive_while_another_process_holds_its_lock_and_dead_once_it_dies(
    tmp_path: Path, node: str
) -> None:
    cfg = SpoolConfig(path=tmp_path)
    assert not nodes.alive(cfg, node), "never started: no holder"
    with held_elsewhere(tmp_path, node) as proc:
        assert nodes.alive(cfg, node)
        assert nodes.alive(cfg, node), "asking takes nothing from the holder"
        with pytest.raises(SpoolBusy):
            nodes.lock(cfg, node).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not nodes.alive(cfg, node)
    taken = nodes.lock(cfg, node)
    taken.acquire()
    taken.release()


def test_a_local_holder_of_only_the_folder_locks_is_alive_too(tmp_path: Path) -> None:
    """A worker of the same host that holds the folders' flocks (say, one from before the lock
    file) is never taken for dead."""
    cfg = SpoolConfig(path=tmp_path)
    Spool(cfg, node="a").ensure()
    fd = os.open(tmp_path / "nodes" / "a" / "journal", os.O_RDONLY | os.O_DIRECTORY)
    try:
        # another open file description: flock conflicts with it even in this process
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert nodes.alive(cfg, "a")
    finally:
        os.close(fd)
    assert not nodes.alive(cfg, "a")


def test_work_is_what_a_node_area_holds_in_active_or_its_journal(tmp_path: Path) -> None:
    cfg = SpoolConfig(path=tmp_path)
    spool = Spool(cfg, node="a")
    spool.ensure()
    (spool.dirs["journal"] / "node.lock").write_text("")
    assert not nodes.has_work(cfg, "a")
    (spool.dirs["journal"] / "00000001.log").write_text("")
    assert nodes.has_work(cfg, "a")
    (spool.dirs["journal"] / "00000001.log").unlink()
    (spool.dirs["active"] / "x.bsmtp").write_text("")
    assert nodes.has_work(cfg, "a")


def test_a_second_worker_with_the_same_host_id_is_refused(tmp_path: Path) -> None:
    srv = SmtpServer()
    spool = tmp_path / "spool"
    settings = {
        "smarthost": f"127.0.0.1:{srv.port}",
        "worker": {"host_id": "h1"},
        "spool": {"path": str(spool)},
    }
    first = WorkerProcess(tmp_path, settings).start()
    try:
        (tmp_path / "two").mkdir()
        other = WorkerProcess(tmp_path / "two", settings)
        try:
            assert other.start().wait_exit(timeout=10) == exitcodes.TEMPFAIL
        finally:
            other.kill()
        (line,) = other.log.read_text().strip().splitlines()
        assert first.proc is not None and f"pid {first.proc.pid}" in line
        assert str(spool / "nodes" / "h1" / "active") in line
        first.drop_drafts("job.bsmtp", [draft("o@example.com", ["a@example.org"])])
        rec = wait_for(lambda: first.final("job.bsmtp"), what="delivered by the first")
        assert rec["state"] == "done"
        assert not (spool / "active").exists(), "a named node works in its own area"
    finally:
        assert first.stop() == 0
        srv.stop()
    assert [m.rcpt_tos for m in srv.messages] == [["a@example.org"]]
