"""Real faults and real hostile users for the tests: a small file system that fills up, and
commands run as the unprivileged user ``nobody``. Both need root (CI runs as root); tests that
use them are skipped elsewhere with the reason."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CI runs as root)")
# nobody cannot enter /root, where the test's own interpreter may live: what runs as nobody
# runs on the system's python3 where there is one
PLAIN_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def nobody() -> tuple[int, int]:
    """The uid and gid of ``nobody``."""
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def become_nobody(groups: Sequence[int] = ()) -> None:
    """Become ``nobody`` with only ``groups`` as supplementary groups (a ``preexec_fn``)."""
    uid, gid = nobody()
    os.setgroups(list(groups))
    os.setgid(gid)
    os.setuid(uid)


def _drop_to_nobody() -> None:
    become_nobody()


def interpreter_reachable() -> None:
    """Let ``nobody`` run this interpreter: its installation may sit under root's 0700 home
    (pyenv), so every folder above it gets the traversal bit for others (never read)."""
    for path in {Path(sys.executable).parent, Path(os.path.realpath(sys.executable)).parent}:
        reachable_by_others(path)


def run_as_nobody(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` as ``nobody`` (no supplementary groups), like ``subprocess.run``."""
    interpreter_reachable()
    return subprocess.run(argv, preexec_fn=_drop_to_nobody, check=False, **kwargs)


def popen_as_nobody(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` as ``nobody``, like ``subprocess.Popen``."""
    interpreter_reachable()
    return subprocess.Popen(argv, preexec_fn=_drop_to_nobody, **kwargs)  # noqa: PLW1509


def reachable_by_others(path: Path) -> None:
    """Let other users traverse every folder above ``path`` (pytest's tmp folders are 0700),
    so that ``nobody`` can reach what the test opens to it, and nothing more."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode & 0o7777
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m", inodes: int | None = None) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (and at most ``inodes`` files) on ``path``: a real file
    system that fills up (ENOSPC) while the test runs. Unmounted (lazily) on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, name: str = "filler") -> Path:
    """Fill the file system holding ``path`` until ENOSPC; return the filler (delete it to
    free the space again)."""
    filler = path / name
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:  # close() must not flush into ENOSPC
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError:
            pass
    with contextlib.suppress(OSError):
        while True:
            with open(filler, "ab") as fh:
                fh.write(b"\0" * 512)
    return filler


def cli_as_nobody(
    argv: list[str], base: Path, stdin: bytes = b"", groups: Sequence[int] = ()
) -> tuple[int, bytes, bytes]:
    """``spoolsmtp ARGV`` in a forked child that has become ``nobody``: its exit code, output
    and errors. The fork has this interpreter loaded, which ``nobody`` may not be able to start
    anew (it can sit under root's 0700 home); stdin, stdout and stderr are files in ``base``;
    ``groups``: its supplementary groups (none by default)."""
    from spoolsmtp.app import cli

    files = {name: base / f"nobody.{name}" for name in ("in", "out", "err")}
    files["in"].write_bytes(stdin)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: drop to nobody, run, report its exit code
        code = 70
        try:
            writing = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            for fd, name, mode in (
                (0, "in", os.O_RDONLY),
                (1, "out", writing),
                (2, "err", writing),
            ):
                os.dup2(os.open(files[name], mode, 0o600), fd)
            # not pytest's stand-ins, which the fork inherited
            sys.stdin = open(0, closefd=False)  # noqa: SIM115
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            become_nobody(groups)
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), files["out"].read_bytes(), files["err"].read_bytes()
