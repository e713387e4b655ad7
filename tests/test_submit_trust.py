"""``submit --wait`` believes only a worker: a process of another user listening on the control
socket's path (it could create the socket's folder) cannot make a job think its mail went."""

from __future__ import annotations

import json
import os
import signal
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolsmtp.app import cli
from tests.forked import as_user, open_base
from tests.hostile import needs_root, nobody
from tests.workerproc import wait_for

SUBMITTER = (4242, 4242)  # a user of its own: neither root, nor the worker, nor the impostor


@pytest.fixture
def base() -> Iterator[Path]:
    with open_base() as path:
        yield path


def serve_as_nobody(path: Path) -> int:
    """A process of ``nobody`` listening at ``path`` that says every envelope was delivered;
    returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            uid, gid = nobody()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            path.chmod(0o666)  # open to anyone, as the worker's public socket is
            server.listen(8)
            while True:
                conn, _ = server.accept()
                with conn, conn.makefile("rwb") as stream:
                    words = stream.readline().split()
                    record = {
                        "id": words[-1].decode() if words else "",
                        "state": "done",
                        "transactions": [
                            {"recipients": [{"address": "a@example.org", "status": "delivered"}]}
                        ],
                    }
                    stream.write(json.dumps({"status": 200, "result": record}).encode() + b"\n")
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(70)
    return pid


@needs_root
def test_wait_does_not_believe_a_listener_that_is_not_the_worker(base: Path) -> None:
    spool = base / "spool"
    (spool / "incoming").mkdir(parents=True)
    spool.chmod(0o755)
    (spool / "incoming").chmod(0o1777)
    (spool / "results").mkdir(mode=0o700)  # the submitter must ask the socket
    folder = base / "control"  # a folder the impostor could make
    folder.mkdir()
    os.chown(folder, *nobody())
    sock = folder / "control.sock"
    conf = base / "conf.yaml"
    conf.write_text(f"hostname: h.test\nspool:\n  path: {spool}\ncontrol:\n  socket: {sock}\n")
    conf.chmod(0o644)
    impostor = serve_as_nobody(sock)
    try:
        wait_for(lambda: sock.exists() and sock.stat().st_mode & 0o002, what="the impostor")
        uid, gid = SUBMITTER
        code, out, err = as_user(
            cli.main,
            ["submit", "--config", str(conf), "--wait=20", "a@example.org"],
            b"Subject: s\n\nbody\n",
            base,
            uid=uid,
            gid=gid,
        )
    finally:
        os.kill(impostor, signal.SIGKILL)
        os.waitpid(impostor, 0)
    assert code == 75, (out, err)
    (queued,) = list((spool / "incoming").iterdir())
    assert out.decode().split()[0] == queued.name.removesuffix(".bsmtp")
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert f"uid {nobody()[0]}" in lines[0] and "not by the worker" in lines[0], lines
