"""Chaos harness: keep the delivery promise under SIGKILL, slow servers and a full disk.

    python scripts/chaos.py [--kills 200] [--seconds 300] [--seed N] [--disk-full] [--json]
                            [--processes N]

A real worker (``python -m spoolsmtp run``) runs as a subprocess on a spool in a temp folder and
delivers to two SMTP sinks on 127.0.0.1 that record every message they receive (by its
``X-Chaos-Id: NAME/N`` header, with the recipients they accepted). The sinks refuse recipients
named ``fail-*`` (550), defer ``defer-*`` twice (450), and answer the final dot slowly at random,
sometimes past the worker's data_end timeout (the RFC 5321 section 6.1 window). Envelopes with
1-3 recipients are dropped into incoming/ (temp name, rename) throughout, while the worker is
killed with SIGKILL at random moments and restarted (``--kills`` times within ``--seconds``).
``--disk-full`` puts the spool on a small tmpfs (root only) and fills and empties it meanwhile.
``--hosts 2`` runs two workers with their own ``worker.host_id`` on the one spool: the first is
left running, the second is the one killed, and restarted after a random pause, so that the
first adopts its envelopes in flight about half of the time; the last clean run is the second.
``--processes N`` (N > 1) runs a supervisor with N delivery processes (``worker.processes``);
each kill then hits a delivery process chosen at random (the supervisor starts it again) or, a
third of the time, the supervisor itself (its delivery processes stop, and it is restarted).
Then a last clean run goes on until nothing is queued (or ``--final-seconds``), and a ledger is
computed per recipient from the sinks' records, results/*.json, bounces/, deadletter/ and
rejected/. Exit status: 0 when nothing was lost, no duplicate went unflagged, every failed
recipient has a report and no envelope was quarantined (none here is poison); 1 otherwise;
2 when the harness itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoolsmtp.bsmtp import writer
from spoolsmtp.model import config
from spoolsmtp.model.envelope import Recipient
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.spool import envfile

QUEUE_FOLDERS = ("incoming", "active", "deferred", "hold")
TIMEOUT = 2.0  # every SMTP timeout of the worker, seconds
CHAOS_ID = re.compile(rb"^X-Chaos-Id:[ \t]*(\S+)", re.M | re.I)
# quarantine too: no envelope here is poison, so each one quarantined is a healthy envelope
# neither delivered nor reported
FATAL = ("lost", "duplicated, not flagged", "failed, no report", "quarantined")
CATEGORIES = (
    "delivered once",
    "flagged, delivered once",
    "duplicated, flagged",
    "duplicated, not flagged",
    "failed, reported",
    "failed, no report",
    "failed, but received",
    "quarantined",
    "still queued",
    "lost",
)


# -- the sinks ---------------------------------------------------------------------------------


@dataclass
class Received:
    chaos_id: str
    recipients: list[str]
    sink: str
    acked: bool = False


@dataclass
class SinkState:
    """What every sink received, shared by both (they run on one event loop thread)."""

    rng: random.Random
    slow: float  # share of dots answered after a delay within the timeout
    too_slow: float  # share of dots answered after the worker's data_end timeout
    received: list[Received] = field(default_factory=list)
    deferred: Counter[str] = field(default_factory=Counter)
    connections: int = 0


class SinkProtocol(asyncio.Protocol):
    """A line-at-a-time SMTP server (no PIPELINING offered) that records what it accepts."""

    def __init__(self, name: str, state: SinkState) -> None:
        self.name = name
        self.state = state
        self.buf = b""
        self.data: list[bytes] | None = None
        self.rcpts: list[str] = []
        self.mail = False
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a delayed reply is pending: hold further input

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state.connections += 1
        transport.write(b"220 sink.chaos.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._lines()

    def _lines(self) -> None:
        while not self.busy and (nl := self.buf.find(b"\n")) >= 0:
            line, self.buf = self.buf[: nl + 1], self.buf[nl + 1 :]
            if self.data is not None:
                self._data_line(line)
            else:
                self._command(line.rstrip(b"\r\n").decode("utf-8", "replace"))

    def _say(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(text.encode() + b"\r\n")

    def _command(self, line: str) -> None:
        verb = line[:4].upper()
        if verb in ("EHLO", "HELO"):
            self.mail, self.rcpts = False, []
            self._say("250-sink.chaos.test\r\n250 8BITMIME" if verb == "EHLO" else "250 sink")
        elif verb == "MAIL":
            self.mail, self.rcpts = True, []
            self._say("250 2.1.0 ok")
        elif verb == "RCPT":
            m = re.search(r"<([^>]*)>", line)
            address = m.group(1) if m else ""
            if not self.mail:
                self._say("503 5.5.1 MAIL first")
            elif address.startswith("fail-"):
                self._say("550 5.1.1 no such user here")
            elif address.startswith("defer-") and self.state.deferred[address] < 2:
                self.state.deferred[address] += 1
                self._say("450 4.2.1 mailbox busy, try later")
            else:
                self.rcpts.append(address)
                self._say("250 2.1.5 ok")
        elif verb == "DATA":
            if not self.rcpts:
                self._say("554 5.5.1 no valid recipients")
            else:
                self.data = []
                self._say("354 go ahead")
        elif verb == "RSET":
            self.mail, self.rcpts = False, []
            self._say("250 2.0.0 ok")
        elif verb == "NOOP":
            self._say("250 2.0.0 ok")
        elif verb == "QUIT":
            self._say("221 2.0.0 bye")
            if self.transport is not None:
                self.transport.close()
        else:
            self._say("502 5.5.2 not implemented")

    def _data_line(self, line: bytes) -> None:
        assert self.data is not None
        if line in (b".\r\n", b".\n"):
            content = b"".join(self.data)
            self.data = None
            m = CHAOS_ID.search(content)
            got = Received(m.group(1).decode() if m else "?", self.rcpts, self.name)
            self.state.received.append(got)  # accepted as soon as the dot is in (RFC 1047)
            self.mail, self.rcpts = False, []
            roll = self.state.rng.random()
            if roll < self.state.too_slow:
                delay = TIMEOUT + 0.5
            elif roll < self.state.too_slow + self.state.slow:
                delay = self.state.rng.uniform(0.2, TIMEOUT * 0.7)
            else:
                delay = 0.0
            if delay:
                self.busy = True
                asyncio.get_running_loop().call_later(delay, self._ack, got)
            else:
                self._ack(got)
            return
        self.data.append(line[1:] if line.startswith(b".") else line)

    def _ack(self, got: Received) -> None:
        self.busy = False
        if self.transport is not None and not self.transport.is_closing():
            got.acked = True
            self._say("250 2.0.0 queued")
            self._lines()


class Sinks:
    """Two sinks on 127.0.0.1, each on its own port, served by one event loop thread."""

    def __init__(self, state: SinkState, count: int = 2) -> None:
        self.state = state
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []
        self.ports: list[int] = []
        for n in range(count):
            name = f"sink{n}"
            server = asyncio.run_coroutine_threadsafe(
                self.loop.create_server(functools.partial(SinkProtocol, name, state), "127.0.0.1"),
                self.loop,
            ).result(10)
            self.servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def _close() -> None:
            for server in self.servers:
                server.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(_close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- the envelopes -----------------------------------------------------------------------------


@dataclass
class Expected:
    """One transaction dropped into incoming/."""

    source: str
    number: int
    sender: str
    recipients: list[str]


class Producer(threading.Thread):
    """Drops envelopes into incoming/ as a careful batch job does, at a steady rate."""

    def __init__(self, spool: Path, rng: random.Random, rate: float, domains: int) -> None:
        super().__init__(daemon=True)
        self.incoming = spool / "incoming"
        self.rng = rng
        self.rate = rate
        self.domains = domains
        self.expected: dict[str, Expected] = {}
        self.not_dropped = 0
        self.halt = threading.Event()
        self.count = 0

    def run(self) -> None:
        while not self.halt.wait(1.0 / self.rate):
            self.drop_one()

    def drop_one(self) -> None:
        self.count += 1
        k, rng = self.count, self.rng
        name = f"e{k:06d}.bsmtp"
        sender = "" if rng.random() < 0.1 else f"job{k}@batch.chaos.test"
        drafts, expected = [], []
        for t in range(1, 3 if rng.random() < 0.2 else 2):
            recipients = []
            for i in range(rng.randint(1, 3)):
                kind = rng.choices(("ok", "defer", "fail"), (70, 15, 15))[0]
                recipients.append(f"{kind}-{k}-{t}-{i}@dest{rng.randrange(self.domains)}.test")
            chaos_id = f"{name}/{t}"
            body = (
                f"From: <{sender or 'mailer-daemon@batch.chaos.test'}>\r\n"
                f"To: {', '.join(recipients)}\r\nSubject: chaos {chaos_id}\r\n"
                f"Message-ID: <{k}.{t}@batch.chaos.test>\r\nX-Chaos-Id: {chaos_id}\r\n\r\n"
                f"line one\r\n.a line that starts with a dot\r\n{'x' * rng.randrange(900)}\r\n"
            ).encode()
            drafts.append(writer.Draft(sender, tuple(Recipient(r) for r in recipients), body))
            expected.append(Expected(name, t, sender, recipients))
        data = writer.render(drafts, "batch.chaos.test")
        tmp = self.incoming / f".{name}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.rename(self.incoming / name)
        except OSError:  # ENOSPC while the disk is full: the job would try again later
            self.not_dropped += 1
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        for exp in expected:
            self.expected[f"{exp.source}/{exp.number}"] = exp


class Filler(threading.Thread):
    """Fills the spool's file system to ENOSPC, holds it full a while, empties it, and again."""

    def __init__(self, spool: Path, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.path = spool / "chaos-filler"
        self.rng = rng
        self.halt = threading.Event()
        self.episodes = 0

    def run(self) -> None:
        block = b"\0" * (1 << 20)
        while not self.halt.is_set():
            with contextlib.suppress(OSError), open(self.path, "wb") as fh:
                while not self.halt.is_set():
                    fh.write(block)
                    fh.flush()
            self.episodes += 1
            self.halt.wait(self.rng.uniform(0.5, 3.0))
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.halt.wait(self.rng.uniform(1.0, 4.0))
        with contextlib.suppress(OSError):
            self.path.unlink()


# -- the worker --------------------------------------------------------------------------------


def write_config(
    work: Path, spool: Path, ports: list[int], host_id: str = "", processes: int = 1
) -> Path:
    phases = ("connect", "greeting", "ehlo", "mail", "rcpt", "data", "data_block", "data_end")
    data: dict[str, Any] = {
        "hostname": "spoolsmtp.chaos.test",
        # a reserve small beside the --disk-full tmpfs: the filler, not the default 64 MiB
        # reserve, decides when the disk is full, and the final run can empty the queue
        "spool": {
            "path": str(spool),
            "settle_seconds": "300ms",
            "rescan_interval": "2s",
            "min_free_space": "2MiB",
            "min_free_inodes": 100,
        },
        "delivery": {
            "timeouts": {**dict.fromkeys(phases, f"{TIMEOUT}s"), "quit": "1s"},
            "tls": "off",
            "idle_timeout": "2s",
        },
        "routes": {f"dest{n}.test": f"127.0.0.1:{port}" for n, port in enumerate(ports)},
        "retry": {
            "interval": "1s",
            "max_interval": "2s",
            "max_age": "1d",
            "warning_age": "0",
            "dead_destination": "1s",
        },
        "shutdown_timeout": "5s",
        "control": {"socket": str(work / "control.sock")},
        # reports are counted in bounces/ and deadletter/; delivered, they would go to the
        # senders' domains, which have no route here (and no DNS but the system's)
        "bounces": {"requeue": False},
        "worker": {"processes": processes},
    }
    if host_id:
        data["worker"]["host_id"] = host_id  # with the processes set above
        data["control"]["operator_socket"] = str(work / "operator" / "control.sock")
    path = work / "conf.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Worker:
    def __init__(self, work: Path, conf: Path) -> None:
        self.work = work
        self.conf = conf
        self.log = work / "worker.log"
        self.exits: Counter[str] = Counter()

    def start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("SPOOLSMTP_CRASH_AT", None)
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "spoolsmtp", "run", "--config", str(self.conf)],
                cwd=self.work,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def ready_since(self, offset: int) -> bool:
        """Whether the worker logged ``ready`` after ``offset`` in its log."""
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            return b" ready" in fh.read()


def two_hosts(
    work: Path, spool: Path, ports: list[int], processes: int = 1
) -> tuple[subprocess.Popen[bytes], Worker]:
    """``--hosts 2``: the steady host h0, started, and the host h1 to be killed, each in a
    folder of its own (config, log, sockets) on the one spool."""
    hosts = []
    for name in ("h0", "h1"):
        own = work / name
        own.mkdir(exist_ok=True)
        config = write_config(own, spool, ports, host_id=name, processes=processes)
        hosts.append(Worker(own, config))
    steady = hosts[0].start()
    wait_until(functools.partial(started, hosts[0], 0, steady), time.monotonic() + 60)
    return steady, hosts[1]


def wait_until(condition: Any, deadline: float, step: float = 0.05) -> bool:
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def started(worker: Worker, offset: int, proc: subprocess.Popen[bytes]) -> bool:
    return worker.ready_since(offset) or proc.poll() is not None


def exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def chaos_phase(
    worker: Worker, rng: random.Random, kills: int, seconds: float, pause: float = 0.0
) -> int:
    """Start, SIGKILL at a random moment, restart (after up to ``pause`` seconds); ``kills``
    times or ``seconds``, whichever first. A fifth of the kills land during start-up
    (recovery); the rest after ``ready``."""
    done, t0 = 0, time.monotonic()
    gap = seconds / max(kills, 1)
    while done < kills and time.monotonic() - t0 < seconds:
        end = t0 + seconds
        before = worker.log_size()
        proc = worker.start()
        if rng.random() < 0.2:
            moment = time.monotonic() + rng.uniform(0.05, 1.0)
        else:
            wait_until(functools.partial(started, worker, before, proc), end)
            moment = time.monotonic() + rng.uniform(0.05, 2 * gap)
        wait_until(functools.partial(exited, proc), min(moment, end), 0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            done += 1
            worker.exits["SIGKILL (ours)"] += 1
        else:
            worker.exits[f"exited by itself: {proc.returncode}"] += 1
        proc.wait(30)
        if pause:
            time.sleep(rng.uniform(0.0, pause))  # a peer may adopt what it had meanwhile
    return done


def delivery_processes(supervisor: int) -> list[int]:
    """The delivery processes a supervisor started (``spoolsmtp child ... --parent PID``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = b"--parent" in argv[:-1] and argv[argv.index(b"--parent") + 1]
            if b"child" in argv and ours == str(supervisor).encode():
                found.append(int(entry))
    return found


def chaos_phase_supervised(worker: Worker, rng: random.Random, kills: int, seconds: float) -> int:
    """``--processes``: SIGKILL a random delivery process (the supervisor starts it again) or,
    a third of the time, the supervisor (then it is started again); ``kills`` times or
    ``seconds``, whichever first."""
    done, t0 = 0, time.monotonic()
    gap = seconds / max(kills, 1)
    proc: subprocess.Popen[bytes] | None = None
    while done < kills and time.monotonic() - t0 < seconds:
        end = t0 + seconds
        if proc is None or proc.poll() is not None:
            if proc is not None:
                worker.exits[f"supervisor exited by itself: {proc.returncode}"] += 1
            before = worker.log_size()
            proc = worker.start()
            wait_until(functools.partial(started, worker, before, proc), end)
        wait_until(functools.partial(exited, proc), time.monotonic() + rng.uniform(0.05, 2 * gap))
        if proc.poll() is not None:
            continue
        children = delivery_processes(proc.pid)
        if children and rng.random() >= 1 / 3:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(children), signal.SIGKILL)
                worker.exits["SIGKILL of a delivery process (ours)"] += 1
                done += 1
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        worker.exits["SIGKILL of the supervisor (ours)"] += 1
        done += 1
        proc = None
    if proc is not None and proc.poll() is None:  # the final run starts a fresh one
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    return done


def final_phase(worker: Worker, spool: Path, seconds: float) -> bool:
    """One clean run until nothing is queued (True) or ``seconds`` pass (False); then SIGTERM."""
    before = worker.log_size()
    proc = worker.start()
    try:
        wait_until(functools.partial(started, worker, before, proc), time.monotonic() + 60)
        empty = wait_until(lambda: not queued_files(spool), time.monotonic() + seconds, 0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        worker.exits[f"final run exit {code}"] += 1
    return empty


def queued_files(spool: Path) -> list[Path]:
    """What is still queued: in the shared folders, and in every node's own active/ (the
    delivery processes of ``--processes``)."""
    out: list[Path] = []
    folders = [spool / name for name in QUEUE_FOLDERS] + sorted(spool.glob("nodes/*/active"))
    for folder in folders:
        if folder.is_dir():
            out += [p for p in folder.iterdir() if not p.name.startswith(".")]
    return out


# -- the ledger --------------------------------------------------------------------------------


def report_failures(path: Path) -> tuple[str | None, set[str]]:
    """The X-Chaos-Id of the reported message and the recipients a report names as failed."""
    data = path.read_bytes()
    try:
        env = envfile.read_bytes(data, path.name, config.Limits(), "chaos")
    except EnvelopeFault:
        return None, set()
    failed: set[str] = set()
    chaos_id: str | None = None
    for tx in env.transactions:
        text = b"".join(envfile.text_chunks(envfile.open_text(path, data), tx.message))
        msg = email.message_from_bytes(text)
        for part in msg.walk():
            ctype = part.get_content_type()
            if ctype == "message/delivery-status":
                payload = part.get_payload()
                blocks = payload if isinstance(payload, list) else []
                for block in blocks:
                    if not isinstance(block, Message):
                        continue
                    action = str(block.get("Action", "")).strip().lower()
                    final = str(block.get("Final-Recipient", ""))
                    if action == "failed" and ";" in final:
                        failed.add(final.split(";", 1)[1].strip().strip("<>"))
            elif ctype in ("text/rfc822-headers", "message/rfc822"):
                raw = part.as_bytes()
                m = CHAOS_ID.search(raw)
                if m:
                    chaos_id = m.group(1).decode()
    return chaos_id, failed


def _source_by_content(spool: Path, rec: dict[str, Any]) -> str | None:
    """The name a record's envelope was dropped as, from the X-Chaos-Id in its file (for a
    record whose ``source`` is not that name)."""
    for folder in ("done", *QUEUE_FOLDERS):
        path = spool / folder / f"{rec['id']}.bsmtp"
        with contextlib.suppress(OSError):
            m = CHAOS_ID.search(path.read_bytes())
            if m:
                return m.group(1).decode().rsplit("/", 1)[0]
    return None


def ledger(spool: Path, expected: dict[str, Expected], received: list[Received]) -> dict[str, Any]:
    got: Counter[tuple[str, str]] = Counter()
    for message in received:
        for address in message.recipients:
            got[(message.chaos_id, address)] += 1
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted((spool / "results").glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            rec = json.loads(path.read_bytes())
            records[rec["source"]].append(rec)
    sources = {e.source for e in expected.values()}
    wrong_source = 0
    for source in [s for s in records if s not in sources]:
        for rec in records.pop(source):
            real = _source_by_content(spool, rec)
            wrong_source += real is not None
            records[real or source].append(rec)
    by_id = {r["id"]: r for recs in records.values() for r in recs}
    reported: Counter[tuple[str, str]] = Counter()
    for folder in ("bounces", "deadletter"):
        for path in sorted((spool / folder).glob("*.ndr.bsmtp")):
            chaos_id, failed = report_failures(path)
            if chaos_id is None:  # fall back on the name: ID.N.ndr.bsmtp
                envelope_id, number = path.name.split(".")[:2]
                rec = by_id.get(envelope_id)
                chaos_id = f"{rec['source']}/{number}" if rec else f"?{path.name}"
            for address in failed:
                reported[(chaos_id, address)] += 1
    rejected = {p.name.split(".", 1)[1] for p in (spool / "rejected").glob("*") if "." in p.name}
    queued = {p.name for p in queued_files(spool)}
    queued_ids = {p.name.split(".")[0] for p in queued_files(spool)}

    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    reported_twice = unexpected_failures = claimed_twice = 0
    for chaos_id, exp in expected.items():
        recs = records.get(exp.source, [])
        claimed_twice += len(recs) > 1 and exp.number == 1
        status: dict[str, dict[str, Any]] = {}
        state = None
        for rec in recs:
            state = rec["state"] if state in (None, "active", "deferred", "held") else state
            for tx in rec["transactions"]:
                if tx["number"] == exp.number:
                    for r in tx["recipients"]:
                        status.setdefault(r["address"], r)
        in_queue = exp.source in queued or any(r["id"] in queued_ids for r in recs)
        for address in exp.recipients:
            n = got[(chaos_id, address)]
            r = status.get(address, {})
            flagged = bool(r.get("possible_duplicate"))
            st = r.get("status")
            reported_twice += reported[(chaos_id, address)] > 1
            if n >= 2:
                cat = "duplicated, flagged" if flagged else "duplicated, not flagged"
            elif exp.source in rejected or state == "rejected":
                cat = "quarantined"
            elif in_queue or st in ("queued", "deferred"):
                cat = "still queued"
            elif n == 1:
                cat = (
                    "failed, but received"
                    if st == "failed"
                    else ("flagged, delivered once" if flagged else "delivered once")
                )
            elif st == "failed":
                cat = "failed, reported" if reported[(chaos_id, address)] else "failed, no report"
                unexpected_failures += not address.startswith("fail-")
            else:
                cat = "lost"
            counts[cat] += 1
            if len(examples[cat]) < 5:
                examples[cat].append(f"{chaos_id} {address} status={st} received={n}")
    return {
        "envelopes": len({e.source for e in expected.values()}),
        "transactions": len(expected),
        "recipients": sum(len(e.recipients) for e in expected.values()),
        "ledger": {c: counts[c] for c in CATEGORIES},
        "reported_more_than_once": reported_twice,
        "failed_though_expected_to_deliver": unexpected_failures,
        "envelopes_with_two_records": claimed_twice,
        "records_naming_another_source": wrong_source,
        "examples": {c: examples[c] for c in CATEGORIES if c not in ("delivered once",)},
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"chaos: {result['kills']} kills in {result['chaos_seconds']:.0f}s, seed {result['seed']}, "
        f"disk full: {result['disk_full_episodes']} episode(s); final run "
        f"{'emptied the queue' if result['final_run_emptied_queue'] else 'hit its deadline'}"
    )
    print(
        f"{result['envelopes']} envelopes ({result['not_dropped']} not dropped: disk full), "
        f"{result['transactions']} transactions, {result['recipients']} recipients; sinks "
        f"received {result['messages_received']} messages "
        f"({result['messages_unacked']} without a reply)"
    )
    print(f"{'outcome per recipient':32} {'count':>7}")
    for cat, n in result["ledger"].items():
        mark = "  <-- broken promise" if cat in FATAL and n else ""
        print(f"{cat:32} {n:7d}{mark}")
    keys = ("reported_more_than_once", "failed_though_expected_to_deliver")
    for key in (*keys, "records_naming_another_source", "envelopes_with_two_records"):
        print(f"{key.replace('_', ' '):32} {result[key]:7d}")
    print(f"worker exits: {dict(result['worker_exits'])}")
    print(f"tracebacks in the worker's log: {result['worker_log_tracebacks']}")
    for cat, items in result["examples"].items():
        for item in items:
            print(f"  e.g. {cat}: {item}")


def ledger_only(work: Path, as_json: bool) -> int:
    spool = work / "spool.saved" if (work / "spool.saved").is_dir() else work / "spool"
    sent = {k: Expected(**v) for k, v in json.loads((work / "sent.json").read_text()).items()}
    received = [Received(**r) for r in json.loads((work / "received.json").read_text())]
    result = ledger(spool, sent, received)
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{'outcome per recipient':32} {'count':>7}")
        for cat, n in result["ledger"].items():
            print(f"{cat:32} {n:7d}")
    return 1 if any(result["ledger"][c] for c in FATAL) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--rate", type=float, default=5.0, help="envelopes dropped per second")
    ap.add_argument("--final-seconds", type=float, default=120.0)
    ap.add_argument("--disk-full", action="store_true", help="spool on a small tmpfs (root)")
    ap.add_argument("--tmpfs-size", default="48m")
    ap.add_argument("--slow", type=float, default=0.1, help="share of dots answered slowly")
    ap.add_argument("--too-slow", type=float, default=0.03, help="... past the timeout")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="kept afterwards (default: a temp folder, removed); with --disk-full the\n"
        "spool is copied to WORKDIR/spool.saved before the tmpfs is unmounted",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--hosts", type=int, choices=(1, 2), default=1, help="workers on the spool")
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker.processes; above 1, kill delivery processes and the supervisor",
    )
    ap.add_argument(
        "--ledger-only",
        type=Path,
        metavar="WORKDIR",
        help="recompute the ledger of an earlier run kept with --workdir",
    )
    args = ap.parse_args(argv)
    if args.ledger_only:
        return ledger_only(args.ledger_only, args.json)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    if args.disk_full and os.geteuid() != 0:
        print("chaos: --disk-full mounts a tmpfs and needs root", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="spoolsmtp-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    spool = work / "spool"
    spool.mkdir(exist_ok=True)
    mounted = False
    if args.disk_full:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_size},mode=0755", "tmpfs", spool],
            check=True,
        )
        mounted = True
    (spool / "incoming").mkdir(exist_ok=True)
    state = SinkState(random.Random(rng.random()), args.slow, args.too_slow)
    sinks = Sinks(state)
    steady: subprocess.Popen[bytes] | None = None
    try:
        worker = Worker(work, write_config(work, spool, sinks.ports, processes=args.processes))
        if args.hosts == 2:
            steady, worker = two_hosts(work, spool, sinks.ports, args.processes)
        producer = Producer(spool, random.Random(rng.random()), args.rate, len(sinks.ports))
        filler = Filler(spool, random.Random(rng.random())) if args.disk_full else None
        producer.start()
        if filler:
            filler.start()
        t0 = time.monotonic()
        pause = 3.0 if steady is not None else 0.0
        if args.processes > 1:
            kills = chaos_phase_supervised(worker, rng, args.kills, args.seconds)
        else:
            kills = chaos_phase(worker, rng, args.kills, args.seconds, pause)
        chaos_seconds = time.monotonic() - t0
        producer.halt.set()
        producer.join()
        if filler:
            filler.halt.set()
            filler.join()
        if steady is not None:
            steady.send_signal(signal.SIGTERM)
            worker.exits[f"steady host exit {steady.wait(60)}"] += 1
        emptied = final_phase(worker, spool, args.final_seconds)
        if args.workdir is not None:  # what the ledger was computed from, for --ledger-only
            (work / "sent.json").write_text(
                json.dumps({k: vars(v) for k, v in producer.expected.items()})
            )
            (work / "received.json").write_text(json.dumps([vars(r) for r in state.received]))
        result = ledger(spool, producer.expected, state.received)
        result.update(
            seed=seed,
            kills=kills,
            chaos_seconds=chaos_seconds,
            disk_full_episodes=filler.episodes if filler else 0,
            final_run_emptied_queue=emptied,
            not_dropped=producer.not_dropped,
            messages_received=len(state.received),
            messages_unacked=sum(not r.acked for r in state.received),
            worker_exits=dict(worker.exits),
            worker_log_tracebacks=sum(
                p.read_bytes().count(b"Traceback") for p in work.glob("**/worker.log")
            ),
            workdir=str(work) if args.workdir else None,
        )
    finally:
        if steady is not None and steady.poll() is None:
            steady.kill()
        sinks.stop()
        if mounted:
            if args.workdir is not None:  # keep what the tmpfs held for a post-mortem
                shutil.copytree(spool, work / "spool.saved", dirs_exist_ok=True)
            subprocess.run(["umount", "-l", str(spool)], check=False)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 1 if any(result["ledger"][c] for c in FATAL) else 0


if __name__ == "__main__":
    sys.exit(main())
