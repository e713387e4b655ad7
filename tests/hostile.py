"""Real faults and real hostile users for the tests: a small file system that fills up, and
commands run as the unprivileged user ``nobody``. Both need root (CI runs as root); tests that
use them are skipped elsewhere with the reason."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CI runs as root)")


def nobody() -> tuple[int, int]:
    """The uid and gid of ``nobody``."""
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _drop_to_nobody() -> None:
    uid, gid = nobody()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def run_as_nobody(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` as ``nobody`` (no supplementary groups), like ``subprocess.run``."""
    return subprocess.run(argv, preexec_fn=_drop_to_nobody, check=False, **kwargs)


def popen_as_nobody(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` as ``nobody``, like ``subprocess.Popen``."""
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
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: close() must not flush (ENOSPC)
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
