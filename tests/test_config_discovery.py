"""Entry points other programs call from anywhere (submit, spoolsmtp-sendmail, ctl) never read a
config from the current folder: a hostile ``conf/spoolsmtp.yaml`` there is ignored."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolsmtp.app import configpath
from tests.helpers import SENDMAIL
from tests.hostile import needs_root, nobody
from tests.workerproc import ROOT

pytestmark = pytest.mark.skipif(
    configpath.SYSTEM_CONFIG.exists(), reason="a system config is installed on this machine"
)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[Path, Path, socket.socket]]:
    """A folder another user controls: its conf/spoolsmtp.yaml points the spool and the control
    socket at places of its choosing (a listening socket stands for the fake worker)."""
    evil = tmp_path / "evil"
    (evil / "conf").mkdir(parents=True)
    (evil / "spool" / "incoming").mkdir(parents=True)
    sock_path = tmp_path / "evil.sock"
    (evil / "conf" / "spoolsmtp.yaml").write_text(
        f"spool:\n  path: {evil}/spool\ncontrol:\n  socket: {sock_path}\n"
    )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(4)
    yield evil, evil / "spool" / "incoming", listener
    listener.close()


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if k != "SPOOLSMTP_CONFIG"}
    return subprocess.run(
        argv,
        cwd=cwd,
        input=b"Subject: s\n\nbody\n",
        capture_output=True,
        check=False,
        timeout=60,
        env={**environ, "PYTHONPATH": str(ROOT), **env},
    )


@pytest.mark.parametrize(
    "argv",
    [
        [str(SENDMAIL), "alice@example.org"],
        [sys.executable, "-m", "spoolsmtp", "submit", "alice@example.org"],
    ],
)
def test_a_hostile_config_in_the_current_folder_is_ignored(
    hostile: tuple[Path, Path, socket.socket], argv: list[str]
) -> None:
    evil, evil_incoming, _ = hostile
    done = _run(argv, evil, {})
    assert list(evil_incoming.iterdir()) == [], "mail written where the folder's owner chose"
    assert done.returncode == 78, done.stderr
    assert b"no config" in done.stderr


def test_the_environment_config_is_used_and_the_folder_is_not(
    tmp_path: Path, hostile: tuple[Path, Path, socket.socket]
) -> None:
    evil, evil_incoming, _ = hostile
    good = tmp_path / "good.yaml"
    (tmp_path / "spool" / "incoming").mkdir(parents=True)
    good.write_text(f"spool:\n  path: {tmp_path}/spool\n")
    done = _run([str(SENDMAIL), "alice@example.org"], evil, {"SPOOLSMTP_CONFIG": str(good)})
    assert done.returncode == 0, done.stderr
    assert list(evil_incoming.iterdir()) == []
    assert len(list((tmp_path / "spool" / "incoming").iterdir())) == 1


def test_ctl_does_not_talk_to_the_socket_the_folder_names(
    hostile: tuple[Path, Path, socket.socket],
) -> None:
    evil, _, listener = hostile
    done = _run([sys.executable, "-m", "spoolsmtp", "ctl", "QUERY"], evil, {})
    readable, _, _ = select.select([listener], [], [], 0)
    assert readable == [], "ctl connected to the socket the folder's config named"
    assert done.returncode == 78, done.stderr


def test_a_relative_spool_in_an_implicit_config_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "rel.yaml"
    conf.write_text("spool:\n  path: spool\n")
    (tmp_path / "spool" / "incoming").mkdir(parents=True)
    done = _run([str(SENDMAIL), "a@example.org"], tmp_path, {"SPOOLSMTP_CONFIG": str(conf)})
    assert done.returncode == 78
    assert b"spool.path" in done.stderr and b"absolute" in done.stderr
    assert list((tmp_path / "spool" / "incoming").iterdir()) == []


@needs_root
def test_a_set_id_caller_ignores_spoolsmtp_config(tmp_path: Path) -> None:
    conf = tmp_path / "chosen.yaml"
    conf.write_text("hostname: h.test\n")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: real uid root, effective uid nobody, as under a set-id program
        answer = b"?"
        try:
            os.environ["SPOOLSMTP_CONFIG"] = str(conf)
            uid, gid = nobody()
            os.setegid(gid)
            os.seteuid(uid)
            answer = str(configpath.for_callers(None)).encode()
        finally:
            os.write(write, answer)
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as fh:
        assert fh.read() == b"None"
    os.environ["SPOOLSMTP_CONFIG"] = str(conf)
    try:
        assert configpath.for_callers(None) == conf
    finally:
        del os.environ["SPOOLSMTP_CONFIG"]
