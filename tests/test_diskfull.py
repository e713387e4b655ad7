"""A full disk while the worker delivers: nothing sent twice unflagged, no envelope wedged in
active/, no connection left open, and the full disk shown as a state, not a flood of logs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from spoolsmtp.model.stats import Stats
from spoolsmtp.spool.diskfull import DiskWatch
from tests.helpers import draft
from tests.hostile import cli_as_nobody, fill, needs_root, reachable_by_others, small_tmpfs
from tests.smtpservers import _LoopThread
from tests.workerproc import ROOT, WorkerProcess, wait_for

PER_DEST = 10
ENVELOPES = 20
RCPTS = 30


class Sink:
    """A plain SMTP server (no extensions) on loopback that counts what a test needs: the
    connections open now and at most, the DATA phases begun and ended, and every recipient of
    every message it accepted. With the gate closed it holds each DATA before its 354."""

    def __init__(self, idle_limit: float | None = 2.0) -> None:
        self.idle_limit = idle_limit
        self.open_now = 0
        self.max_open = 0
        self.at_gate = 0
        self.data_ended = 0
        self.delivered: Counter[str] = Counter()
        self._lt = _LoopThread()
        self._gate = asyncio.Event()
        self._lock = threading.Lock()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self._server: asyncio.Server = self._lt.run(start())
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.open_gate()

    def open_gate(self) -> None:
        self._lt.loop.call_soon_threadsafe(self._gate.set)

    def close_gate(self) -> None:
        self._lt.run(self._close_gate())

    async def _close_gate(self) -> None:
        self._gate.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        rcpts: list[str] = []
        try:
            writer.write(b"220 sink.test ready\r\n")
            while True:
                line = await reader.readuntil(b"\n")
                verb = line[:4].upper()
                if verb == b"RCPT":
                    rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    self.at_gate += 1
                    await self._gate.wait()
                    self.at_gate -= 1
                    writer.write(b"354 go ahead\r\n")
                    try:
                        async with asyncio.timeout(self.idle_limit):  # the server's own limit
                            await reader.readuntil(b"\r\n.\r\n")
                    finally:
                        self.data_ended += 1
                    self.delivered.update(rcpts)
                    rcpts = []
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"RSET":
                    rcpts = []
                    writer.write(b"250 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()

        self._lt.run(close())
        self._lt.stop()


def addresses(n: int) -> list[str]:
    return [f"user{i:03d}-with-a-rather-long-local-part@example{n}.org" for i in range(RCPTS)]


def settings(spool: Path, sink: Sink, **spool_keys: Any) -> dict[str, Any]:
    return {
        "smarthost": f"127.0.0.1:{sink.port}",
        # no reserve unless a test sets one: the tmpfs is far smaller than the default
        "spool": {"path": str(spool), "min_free_space": 0, "min_free_inodes": 0, **spool_keys},
        "delivery": {"max_per_destination": PER_DEST},
        "retry": {"interval": "1s", "max_interval": "2s"},
    }


def on_tmpfs(root: Path, fs: Path, cfg: dict[str, Any]) -> WorkerProcess:
    """A worker whose spool is ``fs/spool`` (its config and log stay in ``root``)."""
    worker = WorkerProcess(root, cfg)
    worker.spool = fs / "spool"
    (worker.spool / "incoming").mkdir(parents=True, exist_ok=True)
    return worker


def drop_burst(worker: WorkerProcess) -> None:
    for n in range(ENVELOPES):
        worker.drop_drafts(f"job{n:02d}.bsmtp", [draft("oper@example.com", addresses(n))])


def fill_at_the_gate(worker: WorkerProcess, sink: Sink, fs: Path) -> Path:
    """Drop the burst; once every envelope is claimed and the sessions wait at DATA, fill the
    disk and open the gate. The filler, to delete when space is to come back."""
    drop_burst(worker)
    wait_for(lambda: sink.at_gate == PER_DEST, what="sessions at DATA")
    wait_for(lambda: len(worker.files("active")) == ENVELOPES, what="all claimed")
    filler = fill(fs)
    sink.open_gate()
    return filler


def once_or_flagged(records: list[dict[str, Any] | None], sink: Sink) -> None:
    """Every recipient delivered, and sent once, or twice with ``possible_duplicate`` set."""
    for rec in records:
        assert rec is not None
        for tx in rec["transactions"]:
            for r in tx["recipients"]:
                assert r["status"] == "delivered", r
                got = sink.delivered[r["address"]]
                assert got == 1 or (got == 2 and r["possible_duplicate"]), (r, got)


@needs_root
def test_disk_full_at_the_dot_then_kill_sends_nothing_twice_unflagged(tmp_path: Path) -> None:
    """The disk fills while the first envelopes wait for the server's 354 (their dot marks,
    begun with MAIL, are on disk already, so their dots go out); the marks of the transactions
    after them cannot be written. Space is freed, the worker is killed (-9) and restarted:
    every recipient got the message once, or twice with ``possible_duplicate`` set."""
    sink = Sink()
    sink.close_gate()
    try:
        with small_tmpfs(tmp_path / "fs", size="4m") as fs:
            cfg = settings(fs / "spool", sink)
            worker = on_tmpfs(tmp_path, fs, cfg).start()
            try:
                filler = fill_at_the_gate(worker, sink, fs)
                wait_for(lambda: sink.data_ended >= ENVELOPES, what="every first DATA over")
                filler.unlink()
            finally:
                worker.kill()
            worker = on_tmpfs(tmp_path, fs, cfg).start()
            try:
                sources = [f"job{n:02d}.bsmtp" for n in range(ENVELOPES)]
                wait_for(lambda: all(worker.final(s) for s in sources), 60, what="all final")
                records = [worker.final(s) for s in sources]
            finally:
                assert worker.stop() == 0
    finally:
        sink.stop()
    once_or_flagged(records, sink)
    quiet(worker.log)


def quiet(log: Path) -> None:
    """A full disk is a handful of log lines: no traceback, no timer callback that died."""
    lines = problems(log)
    assert len(lines) <= 4, lines
    assert not any("Traceback" in line or "Exception in callback" in line for line in lines)


@needs_root
def test_after_a_full_disk_no_envelope_stays_in_active_and_no_connection_leaks(
    tmp_path: Path,
) -> None:
    """The disk fills while a burst waits at DATA: every envelope whose attempt failed is
    tried again once space is back (none left in active/, none sent twice unflagged), and the
    connections to the server are back within the configured limit."""
    sink = Sink(idle_limit=None)
    sink.close_gate()
    try:
        with small_tmpfs(tmp_path / "fs", size="4m") as fs:
            cfg = settings(fs / "spool", sink)
            worker = on_tmpfs(tmp_path, fs, cfg).start()
            try:
                filler = fill_at_the_gate(worker, sink, fs)
                wait_for(lambda: sink.data_ended >= PER_DEST, what="the first DATAs over")
                filler.unlink()
                sources = [f"job{n:02d}.bsmtp" for n in range(ENVELOPES)]
                wait_for(lambda: all(worker.final(s) for s in sources), 60, what="all final")
                wait_for(lambda: not worker.files("active"), 30, what="active/ empty")
                wait_for(lambda: sink.open_now <= PER_DEST, 30, what="connections within limit")
                records = [worker.final(s) for s in sources]
            finally:
                assert worker.stop() == 0
    finally:
        sink.stop()
    once_or_flagged(records, sink)
    quiet(worker.log)


def ctl(worker: WorkerProcess, *words: str) -> dict[str, Any]:
    """One command over the worker's real control socket; its JSON result."""
    result: dict[str, Any] = worker.ask(" ".join(words))["result"]
    return result


def problems(log: Path) -> list[str]:
    """The lines of a worker's log that are not INFO (warnings, errors, tracebacks)."""
    return [
        line
        for line in log.read_text(errors="replace").splitlines()
        if " INFO " not in line and line.strip()
    ]


@needs_root
def test_claims_on_a_full_disk_are_one_episode_not_a_flood(tmp_path: Path) -> None:
    """Files wait in incoming/ while the disk is full: their claims fail (the journal cannot
    be written). The worker says so once, shows it in QUERY and STATS, retries no claim while
    full (though it rescans incoming/ every 50 ms), and once space is freed takes them all and
    says so once more: a handful of log lines, no traceback."""
    sink = Sink()
    try:
        with small_tmpfs(tmp_path / "fs", size="4m") as fs:
            cfg = settings(fs / "spool", sink, rescan_interval="50ms")
            worker = on_tmpfs(tmp_path, fs, cfg).start()
            try:
                ctl(worker, "SUSPEND")
                drop_burst(worker)
                filler = fill(fs)
                ctl(worker, "RESUME")
                wait_for(
                    lambda: (
                        (q := ctl(worker, "QUERY"))["disk_full"]
                        and q["states"]["incoming"] == ENVELOPES
                    ),
                    what="QUERY says disk full, every file waiting in incoming/",
                )
                stats = ctl(worker, "STATS")
                assert stats["disk_full"] is True and stats["disk_full_pauses"] == 1
                filler.unlink()
                wait_for(lambda: not ctl(worker, "QUERY")["disk_full"], what="disk full over")
                sources = [f"job{n:02d}.bsmtp" for n in range(ENVELOPES)]
                wait_for(lambda: all(worker.final(s) for s in sources), 60, what="all final")
                assert ctl(worker, "STATS")["disk_full_pauses"] == 1
            finally:
                assert worker.stop() == 0
    finally:
        sink.stop()
    lines = problems(worker.log)
    assert len(lines) <= 3, lines
    assert any("disk full" in line for line in lines), lines
    assert any("available again" in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines


@needs_root
def test_under_the_reserve_intake_pauses_and_resumes_by_itself(tmp_path: Path) -> None:
    """Free space falls under ``spool.min_free_space`` (files can still be written): new files
    wait in incoming/, QUERY and STATS say so; space comes back and they are delivered."""
    sink = Sink()
    try:
        with small_tmpfs(tmp_path / "fs", size="8m") as fs:
            cfg = settings(fs / "spool", sink, min_free_space="2MiB")
            worker = on_tmpfs(tmp_path, fs, cfg).start()
            try:
                filler = fill(fs)
                os.truncate(filler, filler.stat().st_size - 1024 * 1024)  # 1 MiB left
                query = wait_for(
                    lambda: (q := ctl(worker, "QUERY"))["disk_full"] and q,
                    what="QUERY says disk full",
                )
                drop_burst(worker)
                stats = ctl(worker, "STATS")
                assert stats["disk_full"] is True and stats["disk_full_pauses"] == 1
                wait_for(
                    lambda: ctl(worker, "QUERY")["states"]["incoming"] == ENVELOPES,
                    what="QUERY counts every file waiting in incoming/",
                )
                assert not worker.records(), "nothing taken while under the reserve"
                filler.unlink()
                sources = [f"job{n:02d}.bsmtp" for n in range(ENVELOPES)]
                wait_for(lambda: all(worker.final(s) for s in sources), 60, what="all final")
                assert not ctl(worker, "QUERY")["disk_full"]
            finally:
                assert worker.stop() == 0
    finally:
        sink.stop()
    assert query["disk_full"]
    lines = problems(worker.log)
    assert len(lines) == 2, lines


def run_worker(config: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "spoolsmtp", "run", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


@needs_root
def test_run_on_a_read_only_spool_stops_with_one_line_and_73(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", size="1m") as fs:
        (fs / "spool" / "incoming").mkdir(parents=True)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        config = tmp_path / "conf.yaml"
        config.write_text(json.dumps({"spool": {"path": str(fs / "spool")}}))
        done = run_worker(config)
    assert done.returncode == 73, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    assert str(fs / "spool") in lines[0] and "Traceback" not in done.stderr


@needs_root
def test_run_on_a_spool_of_another_user_stops_with_one_line_and_73(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    reachable_by_others(spool)
    config = tmp_path / "conf.yaml"
    config.write_text(json.dumps({"spool": {"path": str(spool)}}))
    config.chmod(0o644)
    code, _, err = cli_as_nobody(["run", "--config", str(config)], tmp_path)
    assert code == 73, err
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert str(spool) in lines[0] and "Traceback" not in lines[0]


@needs_root
def test_the_reserve_of_inodes_counts_as_well_as_space(tmp_path: Path) -> None:
    """A spool out of inodes is full however many bytes are free."""
    with small_tmpfs(tmp_path / "fs", size="8m", inodes=40) as fs:
        watch = DiskWatch([fs], min_free_space=0, min_free_inodes=10, stats=Stats())
        assert watch.shortage() is None
        made = 0
        while os.statvfs(fs).f_favail >= 10:
            (fs / f"f{made}").touch()
            made += 1
        shortage = watch.shortage()
        assert shortage is not None and "inodes" in shortage and str(fs) in shortage
