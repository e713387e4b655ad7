"""The control sockets against local users: nobody can jam the operators' path, swap the
socket for a symlink, squat its name, or answer ``ctl`` in the worker's place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile import needs_root, nobody, popen_as_nobody, reachable_by_others
from tests.test_control import ask, ctl
from tests.workerproc import WorkerProcess

PLAIN_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

_HAMMER = textwrap.dedent(
    """
    import socket, sys
    path = sys.argv[1]
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
        except OSError:
            pass
        s.close()
    """
)

_SQUAT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1])
    s.listen(16)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(b"200 fake worker\\nall is well\\n.\\n")
        except OSError:
            pass
        c.close()
    """
)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short folder others may enter (socket paths are limited to 108 octets)."""
    path = Path(tempfile.mkdtemp(prefix="spoolsmtp-sock-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _worker(tmp_path: Path, sock: Path, **control: object) -> WorkerProcess:
    return WorkerProcess(
        tmp_path,
        {"smarthost": "127.0.0.1:9", "control": {"socket": str(sock), **control}},
    )


@needs_root
def test_nobody_hammering_the_public_socket_does_not_jam_the_operators(
    tmp_path: Path, folder: Path
) -> None:
    sock = folder / "control.sock"
    w = _worker(tmp_path, sock).start()
    hammers = [
        popen_as_nobody([PLAIN_PYTHON, "-c", _HAMMER, str(sock)], stdout=subprocess.DEVNULL)
        for _ in range(3)
    ]
    try:
        assert all(h.poll() is None for h in hammers)
        results = [ctl(w.config, "STATS") for _ in range(6)]
        results += [ctl(w.config, "SUSPEND"), ctl(w.config, "RESUME")]
        # the public socket too: a full backlog is retried, not given up at once
        results += [ctl(w.config, "--socket", str(sock), "STATS") for _ in range(2)]
        assert all(h.poll() is None for h in hammers), "the hammers kept running throughout"
    finally:
        for h in hammers:
            h.kill()
            h.wait()
        w.kill()
    failed = [r.stderr for r in results if r.returncode != 0]
    assert failed == [], f"{len(failed)} of {len(results)} failed: {failed[:3]}"
    assert "files_taken" in results[0].stdout


@needs_root
def test_the_operator_socket_is_private(tmp_path: Path, folder: Path) -> None:
    w = _worker(tmp_path, folder / "control.sock").start()
    try:
        operator = w.spool / "operator" / "control.sock"
        assert operator.is_socket() and (operator.stat().st_mode & 0o777) == 0o600
        assert (operator.parent.stat().st_mode & 0o777) == 0o700
        reachable_by_others(w.spool)
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try: s.connect(sys.argv[1])\n"
            "except PermissionError: sys.exit(3)\n"
        )
        as_nobody = popen_as_nobody([PLAIN_PYTHON, "-c", probe, str(operator)])
        assert as_nobody.wait(30) == 3
    finally:
        w.kill()


def _refused(w: WorkerProcess, *words: str) -> str:
    w.start()
    try:
        assert w.wait_exit() == 78
    finally:
        w.kill()
    text = w.log.read_text()
    assert "Traceback" not in text
    for word in words:
        assert word in text, text
    return text


@needs_root
def test_a_socket_folder_others_can_write_is_refused(tmp_path: Path, folder: Path) -> None:
    folder.chmod(0o1777)
    w = _worker(tmp_path, folder / "control.sock")
    _refused(w, f"refusing the socket folder {folder}", "writable by group or others")
    assert not (folder / "control.sock").exists()


@needs_root
def test_a_socket_squatted_by_nobody_stops_start_and_ctl_does_not_believe_it(
    tmp_path: Path, folder: Path
) -> None:
    sock = folder / "control.sock"
    folder.chmod(0o777)  # long enough for nobody to bind there; then only root may write
    squat = popen_as_nobody([PLAIN_PYTHON, "-c", _SQUAT, str(sock)], stdout=subprocess.PIPE)
    try:
        assert squat.stdout is not None and squat.stdout.readline() == b"listening\n"
        folder.chmod(0o755)
        assert sock.stat().st_uid == nobody()[0]
        w = _worker(tmp_path, sock, operator_socket=str(folder / "op" / "control.sock"))
        _refused(w, str(sock), "another process is answering")
        told = ctl(w.config, "--socket", str(sock), "HELP")
        assert told.returncode == 69 and "not by the worker" in told.stderr
        assert "fake worker" not in told.stdout
    finally:
        squat.send_signal(signal.SIGKILL)
        squat.wait()
        assert squat.stdout is not None
        squat.stdout.close()
    # dead now, but still nobody's: not ours to remove
    _refused(w, str(sock), "not ours")
    assert sock.exists()


@needs_root
def test_a_planted_symlink_is_never_followed(tmp_path: Path, folder: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    target.chmod(0o600)
    (folder / "control.sock").symlink_to(target)
    w = _worker(tmp_path, folder / "control.sock")
    _refused(w, "is not a socket")
    assert (target.stat().st_mode & 0o7777) == 0o600 and target.stat().st_uid == 0
    assert (folder / "control.sock").is_symlink()


def test_the_sockets_get_their_modes_even_under_umask_077(tmp_path: Path, folder: Path) -> None:
    sock = folder / "control.sock"
    w = _worker(tmp_path, sock, mode="0666")
    old = os.umask(0o077)
    try:
        w.start()
    finally:
        os.umask(old)
    try:
        assert (sock.stat().st_mode & 0o777) == 0o666
        assert ask(sock, "STATS")["status"] == 200
    finally:
        w.kill()


_OPERATOR = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
    except PermissionError:
        print("EACCES")
        sys.exit(0)
    s.sendall(b"JSON SUSPEND\\n")
    print(s.makefile().readline(), end="")
    """
)


@needs_root
@pytest.mark.parametrize(("groups", "said"), [([4242], '"status": 200'), ([], "EACCES")])
def test_the_operator_group_reaches_the_operator_socket_and_no_one_else(
    tmp_path: Path, folder: Path, groups: list[int], said: str
) -> None:
    operator = folder / "op" / "control.sock"
    w = _worker(
        tmp_path,
        folder / "control.sock",
        operator_socket=str(operator),
        operator_group="4242",
        authorized_groups=["4242"],
    ).start()
    uid, gid = nobody()

    def drop() -> None:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)

    try:
        assert (operator.stat().st_mode & 0o777, operator.stat().st_gid) == (0o660, 4242)
        assert (operator.parent.stat().st_mode & 0o777) == 0o710
        done = subprocess.run(
            [PLAIN_PYTHON, "-c", _OPERATOR, str(operator)],
            preexec_fn=drop,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        w.kill()
    assert said in done.stdout, done.stderr
