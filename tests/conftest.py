"""Fixtures shared by the test files: a plain SMTP server, folders other users can reach, and
no worker left running after a test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.smtpservers import SmtpServer
from tests.workerproc import WorkerProcess


@pytest.fixture(autouse=True)
def no_worker_left() -> Iterator[None]:
    """A test that fails half-way leaves no worker running into the next test (a worker of a
    module-scoped fixture, started before the test, is that fixture's to stop)."""
    before = len(WorkerProcess.started)
    yield
    while len(WorkerProcess.started) > before:
        WorkerProcess.started.pop().kill()


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    """A well-behaved SMTP server on loopback that accepts everything."""
    srv = SmtpServer()
    yield srv
    srv.stop()


def _open_folder(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user may enter, outside pytest's tmp tree (which is 0700, and which a
    later pytest run makes 0700 again); removed with everything in it afterwards."""
    yield from _open_folder("spoolsmtp-open-")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A folder anyone may enter, for a socket an unprivileged process must reach."""
    yield from _open_folder("spoolsmtp-ctl-")
