"""A worker run as a real subprocess over a spool in a temp folder, and helpers to feed it."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import yaml

from spoolsmtp.bsmtp import writer
from spoolsmtp.control import client
from tests.smtpservers import SmtpServer

ROOT = Path(__file__).parent.parent


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """A client socket connected to the control socket at ``path``, as ``ctl`` connects:
    through its folder's descriptor (pytest's paths can be longer than the 108 octets of a
    socket address), once, without ``ctl``'s retries or its check of who answers."""
    return client.connect_once(path, timeout)


def exchange(sock: socket.socket, line: bytes) -> bytes:
    """Send one command line on a connected control socket; its whole answer (a JSON line for
    ``JSON ...``, else text up to the lone dot), or what came before the worker closed."""
    sock.sendall(line + b"\n")
    as_json = line[:5].upper() == b"JSON "
    data = b""
    while not (data.endswith(b"\n") if as_json else data.endswith(b"\n.\n")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def request(path: Path, line: str, timeout: float = 10.0) -> str:
    """One command over the real control socket at ``path``, as any client sends it; the raw
    answer."""
    with connect(path, timeout) as sock:
        return exchange(sock, line.encode()).decode()


def ask(path: Path, line: str) -> dict[str, Any]:
    """One command as ``JSON <line>``; the decoded answer."""
    answer: dict[str, Any] = json.loads(request(path, f"JSON {line}"))
    return answer


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


class WorkerProcess:
    """``spoolsmtp run`` on ``root/spool`` with the given config sections."""

    # every worker started, so that one a failing test left running is killed (conftest.py)
    started: ClassVar[list[WorkerProcess]] = []

    def __init__(self, root: Path, settings: dict[str, Any], env: dict[str, str] | None = None):
        self.root = root
        self.spool = root / "spool"
        data: dict[str, Any] = {"hostname": "spoolsmtp.test", **settings}
        spool = data.setdefault("spool", {})
        spool.setdefault("path", str(self.spool))
        spool.setdefault("settle_seconds", "300ms")
        delivery = data.setdefault("delivery", {})
        phases = ("connect", "greeting", "ehlo", "mail", "rcpt", "data", "data_block", "data_end")
        delivery.setdefault("timeouts", dict.fromkeys(phases, "3s"))
        self.config = root / "conf.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.log = root / "worker.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        for name in ("incoming",):
            (self.spool / name).mkdir(parents=True, exist_ok=True)

    def start(self) -> WorkerProcess:
        environ = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        if "SPOOLSMTP_CRASH_AT" not in self.env:
            environ.pop("SPOOLSMTP_CRASH_AT", None)
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 - closed in stop/wait
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spoolsmtp", "run", "--config", str(self.config)],
            cwd=self.root,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=environ,
        )
        WorkerProcess.started.append(self)
        proc = self.proc
        wait_for(lambda: self.answers() or proc.poll() is not None, what="worker ready")
        return self

    def _configured(self, key: str, default: str) -> Path:
        data = yaml.safe_load(self.config.read_text())
        spool = Path(data["spool"]["path"])
        host = data.get("worker", {}).get("host_id") or ""  # a host's own: in its node area
        own = spool / "nodes" / host if host else spool
        return Path(data.get("control", {}).get(key) or own / default)

    @property
    def control_socket(self) -> Path:
        """The public control socket, as the config names it."""
        return self._configured("socket", "control.sock")

    @property
    def operator_socket(self) -> Path:
        """The operator socket, as the config names it."""
        return self._configured("operator_socket", "operator/control.sock")

    def answers(self) -> bool:
        """True once this worker (not another one on the same spool) answers STATS on its
        operator socket: the last one it opens, after resuming the spool and just before it
        watches incoming/. Its readiness, without reading its log."""
        assert self.proc is not None
        try:
            with connect(self.operator_socket, timeout=5) as sock:
                pid = struct.unpack(
                    "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                )[0]
                return pid == self.proc.pid and exchange(sock, b"JSON STATS").endswith(b"\n")
        except OSError:
            return False

    def readies(self) -> int:
        """How many times the process this started (a supervisor, not its delivery
        processes) logged "ready": once incoming/ is watched, a moment after ``answers``;
        again after each REBOOT."""
        assert self.proc is not None
        return self.log.read_text().count(f"spoolsmtp[{self.proc.pid}] INFO ready\n")

    def ask(self, line: str) -> dict[str, Any]:
        """One command on this worker's operator socket (every command is allowed there)."""
        return ask(self.operator_socket, line)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the test fails, but leaves no worker behind
            self.proc.wait(10)
            raise
        finally:
            self._log_fh.close()

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log_fh.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._log_fh.close()

    # -- spool helpers ---------------------------------------------------------------------

    def drop(self, name: str, data: bytes) -> None:
        """Write an envelope into incoming/ as a careful job does: dot-file, then rename."""
        tmp = self.spool / "incoming" / f".{name}"
        tmp.write_bytes(data)
        tmp.rename(self.spool / "incoming" / name)

    def drop_drafts(self, name: str, drafts: list[writer.Draft], **kw: Any) -> None:
        self.drop(name, writer.render(drafts, "batch.test", **kw))

    def records(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted((self.spool / "results").glob("*.json")):
            try:
                out.append(json.loads(path.read_bytes()))
            except ValueError:
                continue
        return out

    def record_for(self, source: str) -> dict[str, Any] | None:
        for rec in self.records():
            if rec["source"] == source:
                return rec
        return None

    def in_state(self, source: str, *states: str) -> dict[str, Any] | None:
        """The result record of ``source`` if it is in one of ``states``, else None."""
        rec = self.record_for(source)
        return rec if rec is not None and rec["state"] in states else None

    def final(self, source: str) -> dict[str, Any] | None:
        return self.in_state(source, "done", "rejected")

    def files(self, folder: str) -> list[Path]:
        path = self.spool / folder
        return (
            sorted(p for p in path.iterdir() if not p.name.startswith(".")) if path.exists() else []
        )


def ctl(config: Path, *words: str) -> subprocess.CompletedProcess[str]:
    """``spoolsmtp ctl --config CONFIG WORDS...`` as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "spoolsmtp", "ctl", "--config", str(config), *words],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def start_worker(root: Path, server: SmtpServer | int, **settings: Any) -> WorkerProcess:
    """A started worker on ``root/spool`` whose smarthost is ``server`` (or a port on
    loopback) unless ``settings`` name another route."""
    port = server if isinstance(server, int) else server.port
    settings.setdefault("smarthost", f"127.0.0.1:{port}")
    return WorkerProcess(root, settings).start()


def spoolsmtp(*args: str) -> list[str]:
    """The argv of ``spoolsmtp ARGS...`` run by this interpreter."""
    return [sys.executable, "-m", "spoolsmtp", *args]


def run(
    argv: list[str], cwd: Path, stdin: bytes, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    """Run a command of this checkout with ``stdin`` as its input; its output captured."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        argv, cwd=cwd, input=stdin, capture_output=True, check=False, timeout=120, env=environ, **kw
    )
