"""The worker under systemd: the unit file verifies, and the worker speaks the sd_notify
protocol to a real datagram socket standing in for systemd (READY=1 only once its control
socket answers, WATCHDOG=1 from its event loop, RELOADING=1/READY=1 around RELOAD, STOPPING=1
on SIGTERM), at a path or at an abstract name."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolsmtp.app import sdnotify
from tests.smtpservers import SmtpServer
from tests.workerproc import ROOT, WorkerProcess, request, wait_for

UNIT = ROOT / "contrib" / "spoolsmtp.service"


class StandIn:
    """A datagram socket where systemd's would be; every message with when it came, and
    whether the worker's control socket answered at that moment."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.folder = Path(tempfile.mkdtemp(prefix="notify-"))
        if abstract:
            name = f"spoolsmtp-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = self.folder / "notify"
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str], bool]] = []
        self.control: Path | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _answers(self) -> bool:
        if self.control is None:
            return False
        try:
            return request(self.control, "JSON STATS", timeout=5).startswith('{"status": 200')
        except OSError:
            return False

    def _listen(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            lines = data.decode().split("\n")
            answered = self._answers() if "READY=1" in lines else False
            self.messages.append((time.monotonic(), lines, answered))

    def said(self, line: str) -> list[tuple[float, list[str], bool]]:
        return [m for m in list(self.messages) if line in m[1]]

    def order(self) -> list[str]:
        """The state changes in the order they came (watchdog pings left out)."""
        keys = ("READY=1", "RELOADING=1", "STOPPING=1")
        return [line for _, lines, _ in list(self.messages) for line in lines if line in keys]

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def standin(request: pytest.FixtureRequest) -> Iterator[StandIn]:
    s = StandIn(abstract=request.param == "abstract")
    yield s
    s.close()


def test_ready_watchdog_reload_and_stopping_reach_systemd(
    tmp_path: Path, server: SmtpServer, standin: StandIn
) -> None:
    w = WorkerProcess(
        tmp_path,
        {"smarthost": f"127.0.0.1:{server.port}"},
        env={"NOTIFY_SOCKET": standin.env, "WATCHDOG_USEC": "400000"},
    )
    standin.control = w.operator_socket
    w.start()
    (ready,) = wait_for(lambda: standin.said("READY=1"), what="READY=1")
    assert ready[2], "READY=1 came before the control socket answered"
    assert any(line.startswith("STATUS=") for line in ready[1])
    # the watchdog: pings keep coming from the running loop, every WATCHDOG_USEC/2
    wait_for(lambda: len(standin.said("WATCHDOG=1")) >= 4, what="four watchdog pings")
    assert w.ask("RELOAD")["status"] == 200
    wait_for(lambda: standin.order() == ["READY=1", "RELOADING=1", "READY=1"], what="reload")
    (reloading,) = standin.said("RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading[1])
    assert w.stop() == 0
    assert standin.order() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_without_notify_socket_nothing_is_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert sdnotify.watchdog_interval() == 0.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    assert sdnotify.notify("READY=1") is False  # unreachable: logged, not raised


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_unit_file_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for setting in (
        "Type=notify",
        "WatchdogSec=",
        "User=spoolsmtp",
        "ReadWritePaths=/var/spool/spoolsmtp",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ):
        assert f"\n{setting}" in text, setting
    (reload,) = [line for line in text.splitlines() if line.startswith("ExecReload=")]
    assert reload.endswith(" RELOAD")
    # the commands must exist for verify: this checkout's, where the unit names /usr/local/bin
    here = Path(sys.executable).with_name("spoolsmtp")
    unit = tmp_path / "spoolsmtp.service"
    unit.write_text(text.replace("/usr/local/bin/spoolsmtp", str(here)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
