"""A worker run as a real subprocess over a spool in a temp folder, and helpers to feed it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from spoolsmtp import writer

ROOT = Path(__file__).parent.parent


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
        before = self.ready_count() if self.log.exists() else 0
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 - closed in stop/wait
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spoolsmtp", "run", "--config", str(self.config)],
            cwd=self.root,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=environ,
        )
        proc = self.proc
        wait_for(
            lambda: self.ready_count() > before or proc.poll() is not None,
            what="worker ready",
        )
        return self

    def ready_count(self) -> int:
        return self.log.read_bytes().count(b" ready")

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
