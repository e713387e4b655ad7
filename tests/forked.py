"""A command run in a forked child under another uid: no interpreter path to make reachable
(the child is this very interpreter), real kernel permission checks for that uid."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.hostile import nobody, reachable_by_others

Main = Callable[[Sequence[str]], int]


def as_user(
    main: Main,
    argv: Sequence[str],
    stdin: bytes,
    base: Path,
    *,
    uid: int | None = None,
    gid: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, bytes, bytes]:
    """``main(argv)`` in a child process running as ``uid`` (default: nobody), with ``stdin``
    as its input: the exit code, its standard output and its standard error."""
    if uid is None or gid is None:
        uid, gid = nobody()
    files = {name: base / f"forked.{os.getpid()}.{name}" for name in ("in", "out", "err")}
    files["in"].write_bytes(stdin)
    for name in ("out", "err"):
        files[name].unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: drop to the uid, run the command, report its exit code
        code = 70
        try:
            os.dup2(os.open(files["in"], os.O_RDONLY), 0)
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(files[name], os.O_WRONLY | os.O_CREAT, 0o600), fd)
            sys.stdin = open(0, closefd=False)  # noqa: SIM115 - pytest's stand-ins, replaced
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.environ.update(env or {})
            if (uid, gid) != (os.geteuid(), os.getegid()):
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            code = main(list(argv))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out, err = files["out"].read_bytes(), files["err"].read_bytes()
    for path in files.values():
        path.unlink()
    return os.waitstatus_to_exitcode(status), out, err


@contextmanager
def open_base() -> Iterator[Path]:
    """A folder outside pytest's 0700 tmp tree (mode 0755), so that another uid can reach what
    the test opens to it and nothing more; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="spoolsmtp-forked-"))
    reachable_by_others(base)
    base.chmod(0o755)
    try:
        yield base
    finally:
        for path in sorted(base.rglob("*"), reverse=True):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        base.rmdir()
