"""Fuzz the parsers that read untrusted input: envelope files, SMTP replies, control commands.

    python scripts/fuzz.py --target reader|reply|control [--runs N | --seconds S]
                           [--engine atheris|hypothesis]
    python scripts/fuzz.py --big      # a 1M-recipient and a 100k-transaction file: RSS, seconds

Every input must give a clean result or the module's documented error (``EnvelopeFault`` for the
reader, ``RemoteProtocolError`` for the reply parser, an ``Answer`` for every control command),
never any other exception, and must keep each target's invariants (below). atheris (coverage
guided, seeded from tests/corpus/) is used when installed, else hypothesis; tests/test_fuzz.py
runs the same targets with hypothesis for a fixed number of examples. A crash is printed with
the input (repr) and written to ``--crash-dir`` (default: fuzz-crashes/).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoolsmtp.bsmtp.reader import Reader
from spoolsmtp.control import commands
from spoolsmtp.control import server as control
from spoolsmtp.control.port import COUNTED, NoSuchEnvelope, Reloaded, Traffic
from spoolsmtp.control.tracer import Tracer
from spoolsmtp.delivery.route import destination_for
from spoolsmtp.model import config
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.model.record import State
from spoolsmtp.model.reply import sanitise
from spoolsmtp.model.stats import Stats
from spoolsmtp.smtp.protocol import (
    ClientProtocol,
    Command,
    Event,
    Extensions,
    RemoteProtocolError,
    ReplyParser,
    Verb,
)
from spoolsmtp.spool import (
    diskfull,
    envfile,
)
from spoolsmtp.spool.nodes import Adopted, NoSuchNode

CORPUS = ROOT / "tests" / "corpus"
LIMITS = config.Config().limits
MAX_FILE = 1 << 20
MAX_REPLIES = 200

# -- reader ------------------------------------------------------------------------------------


def _read(data: bytes, step: int) -> Any:
    reader = Reader("fuzz", LIMITS, "mx.fuzz", MAX_FILE)
    try:
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
        return reader.finish()
    except EnvelopeFault as exc:
        return f"fault: {exc}"


def target_reader(data: bytes, chunks: bool = True) -> None:
    """The envelope reader: an Envelope or EnvelopeFault; the same however the bytes arrive
    (unless ``chunks`` is false); no message whose wire form could end DATA early."""
    whole = _read(data, max(len(data), 1))
    step = 1 + (data[0] % 13 if data else 0)
    if chunks:
        assert _read(data, step) == whole, f"reading {step} bytes at a time differs"
    if isinstance(whole, str):
        return
    for tx in whole.transactions:
        wire = b"".join(envfile.wire_chunks(envfile.open_text(Path("-"), data), tx.message))
        assert b"\r\n.\r\n" not in b"\r\n" + wire, "a message that ends DATA early on the wire"
        assert tx.recipients, "a transaction without recipients"


# -- reply -------------------------------------------------------------------------------------


def target_reply(data: bytes) -> None:
    """The reply parser (fed in pieces) and the client protocol: replies or RemoteProtocolError."""
    cut = data[0] % 7 + 1 if data else 1
    parser = ReplyParser()
    try:
        for i in range(0, len(data), cut):
            parser.feed(data[i : i + cut])
            while (reply := parser.next_reply()) is not None:
                assert 200 <= reply.code <= 599, reply
                if reply.enhanced is not None:
                    assert reply.enhanced[0] == str(reply.code)[0], reply
                assert sanitise(reply.text).isascii()
                Extensions.parse(reply)
                reply.render()
    except RemoteProtocolError:
        pass
    proto = ClientProtocol()
    proto.receive_data(data)
    verbs = [Verb.EHLO, Verb.MAIL, Verb.RCPT, Verb.DATA, Verb.RSET, Verb.NOOP, Verb.QUIT]
    try:
        for n in range(MAX_REPLIES):
            event = proto.next_event()
            if not isinstance(event, Event) or proto.closed:
                return
            if event.command.verb is Verb.DATA and event.reply.code == 354:
                proto.send_body(b"x\r\n")
                proto.send_end_of_data()
            elif proto.outstanding == 0:
                verb = verbs[n % len(verbs)]
                proto.send(Command(verb, f"{verb.name} fuzz"))
    except RemoteProtocolError:
        pass


# -- control -----------------------------------------------------------------------------------


_RECORD = (
    '{"id": "ID1", "source": "job.bsmtp", "state": "deferred", "location": "deferred/ID1.bsmtp",'
    ' "received_at": "2026-01-01T00:00:00Z", "transactions": [{"number": 1, "mail_from": "a@b",'
    ' "recipients": [{"address": "c@d.test", "status": "deferred", "attempts": 1}]}]}'
)


@dataclass
class _Summary:
    id: str
    source: str
    state: State
    received: float
    next_attempt: float | None = None
    destinations: dict[str, int] = field(default_factory=dict)


class FakeWorker:
    """A small implementation of the control port (port.py), behaving as the worker does:
    domains are routed by route.destination_for, as its Router does; ID1 has a result record."""

    def __init__(self) -> None:
        self.cfg = config.Config()
        self.index = {
            "ID1": _Summary("ID1", "job.bsmtp", State.DEFERRED, time.time(), None, {"d.test": 1}),
            "ID2": _Summary("ID2", "k.bsmtp", State.HELD, time.time(), None, {"[1.2.3.4]:25": 1}),
        }
        self.suspended = False
        self.tracer = Tracer()
        self.stats = Stats()
        self.disk = diskfull.DiskWatch([], 0, 0, self.stats)

    def traffic(self) -> Traffic:
        return Traffic()

    async def folder_counts(self) -> dict[str, int]:
        return dict.fromkeys(COUNTED, 0)

    async def result(self, envelope_id: str) -> dict[str, Any]:
        if envelope_id != "ID1":
            raise NoSuchEnvelope(envelope_id)
        record: dict[str, Any] = json.loads(_RECORD)
        return record

    def destination_key(self, domain: str) -> str:
        return destination_for(domain, self.cfg).key

    def dead_destinations(self) -> dict[str, float]:
        return {}

    async def hold(self, envelope_id: str) -> str:
        return f"{self.index[envelope_id].id} held"

    async def release(self, envelope_id: str) -> str:
        return f"{self.index[envelope_id].id} released"

    def flush(self, envelope_id: str | None = None, destination: str | None = None) -> int:
        if destination is not None:
            self.destination_key(destination)
        # a queued id, as the port promises (else a KeyError)
        return 0 if envelope_id is None else int(self.index[envelope_id].state is State.DEFERRED)

    def expire(self, domain: str) -> bool:
        self.destination_key(domain)
        return False

    def suspend(self) -> None:
        self.suspended = True

    def resume(self) -> None:
        self.suspended = False

    def reload(self) -> Reloaded:
        return Reloaded(self.cfg.source)

    def stop(self) -> None: ...

    async def adopt(self, node: str) -> Adopted:
        raise NoSuchNode(node)


_CONTROL: tuple[FakeWorker, asyncio.AbstractEventLoop] | None = None


def _control() -> tuple[FakeWorker, asyncio.AbstractEventLoop]:
    global _CONTROL
    if _CONTROL is None:
        _CONTROL = (FakeWorker(), asyncio.new_event_loop())
    return _CONTROL


def target_control(data: bytes) -> None:
    """A request line as control.py reads it: parse, execute, render; always an Answer."""
    worker, loop = _control()
    line = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if line.upper().startswith("JSON ") or line.upper() == "JSON":
        line = line[4:].strip()
    verb, args = commands.parse(line)
    if not verb or verb in ("QUIT", "EXIT", "FOLLOW"):
        return
    answer = loop.run_until_complete(commands.execute(worker, verb, args))
    assert isinstance(answer, commands.Answer)
    json.loads(answer.as_json())
    control.frame_text(answer)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "reader": target_reader,
    "reply": target_reply,
    "control": target_control,
}

# -- hypothesis strategies (also used by tests/test_fuzz.py) ----------------------------------


def strategy(target: str) -> Any:
    """Inputs for ``target``: mostly well-formed pieces in random order, some raw bytes."""
    from hypothesis import strategies as st

    if target == "reader":
        addr = st.sampled_from(["<a@b.test>", "<>", "a@b.test", "<@x:a@b>", "<a@[1.2.3.4]>"])
        params = st.sampled_from(
            ["", " SIZE=10", " BODY=8BITMIME", " RET=HDRS ENVID=x+2B", " NOTIFY=NEVER", " X=Y"]
        )
        command = st.one_of(
            st.sampled_from(["HELO h", "EHLO h", "DATA", "RSET", "QUIT", "NOOP", "VERB ON"]),
            st.sampled_from(["TICK 1", ".", "..", ". ", "Subject: x", "Received: x", ""]),
            st.builds(lambda a, p: f"MAIL FROM:{a}{p}", addr, params),
            st.builds(lambda a, p: f"RCPT TO:{a}{p}", addr, params),
            st.text(max_size=30),
        ).map(lambda s: s.encode("utf-8", "surrogatepass"))
        ending = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b"\x00\n"])
        line = st.tuples(command, ending).map(b"".join) | st.binary(max_size=20)
        return st.lists(line, max_size=40).map(b"".join)
    if target == "reply":
        code = st.sampled_from(["220", "250", "354", "421", "450", "550", "199", "600", "25"])
        text = st.sampled_from(["", "ok", "2.1.0 ok", "5.1.1 x", "PIPELINING", "SIZE 9", "\xff"])
        sep = st.sampled_from([" ", "-", "", "\t"])
        one = st.builds(lambda c, s, t: f"{c}{s}{t}", code, sep, text).map(str.encode)
        ending = st.sampled_from([b"\r\n", b"\n", b"\r"])
        line = st.tuples(one, ending).map(b"".join) | st.binary(max_size=40)
        return st.lists(line, max_size=20).map(b"".join)
    verbs = ["QUERY", "QUEUE", "STATS", "HELP", "TRACE", "NOTRACE", "DEBUG", "NODEBUG", "HOLD"]
    verbs += ["RELEASE", "FLUSH", "EXPIRE", "SUSPEND", "RESUME", "RELOAD", "SHUTDOWN", "JSON"]
    args = ["DEST", "ALL", "ID1", "ID2", "d.test", "[1.2.3.4]", "[IPv6:::1]", "[x]", "session"]
    args += ["..", ".x", "a/b", "x" * 300, "a\x00b", "\u00e9", "*"]
    verb = st.sampled_from(verbs) | st.text(max_size=8)
    arg = st.sampled_from(args) | st.text(min_size=1, max_size=12)
    words = st.tuples(verb, st.lists(arg, max_size=3)).map(lambda t: [t[0], *t[1]])
    return words.map(lambda ws: " ".join(ws).encode("utf-8", "surrogatepass"))


# -- engines -----------------------------------------------------------------------------------


def _save_crash(crash_dir: Path, target: str, data: bytes, exc: BaseException) -> None:
    crash_dir.mkdir(parents=True, exist_ok=True)
    name = crash_dir / f"{target}-{abs(hash(data)) % 10**10}.bin"
    name.write_bytes(data)
    print(f"CRASH {target}: {type(exc).__name__}: {exc}\n  input {data[:300]!r}\n  saved {name}")


def run_hypothesis(target: str, runs: int | None, seconds: float | None, crash_dir: Path) -> int:
    from hypothesis import HealthCheck, given, settings

    fn = TARGETS[target]
    end = time.monotonic() + seconds if seconds else None
    batch = runs or 2000
    rounds = 0
    while True:
        rounds += 1

        @settings(
            max_examples=batch,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy(target))
        def check(data: bytes) -> None:
            try:
                fn(data)
            except Exception:
                failing[:] = [data]  # noqa: B023 - the last one raised is the shrunk one
                raise

        failing: list[bytes] = []
        try:
            check()
        except Exception as exc:
            _save_crash(crash_dir, target, failing[0] if failing else b"", exc)
            return 1
        if end is None or time.monotonic() > end:
            print(f"{target}: {rounds * batch} inputs, no crash")
            return 0


def run_atheris(target: str, runs: int | None, seconds: float | None, crash_dir: Path) -> int:
    import atheris  # type: ignore[import-untyped]

    fn = TARGETS[target]

    def one(data: bytes) -> None:
        try:
            fn(data)
        except Exception as exc:
            _save_crash(crash_dir, target, data, exc)
            raise

    seeds = Path(tempfile.mkdtemp(prefix=f"spoolsmtp-fuzz-{target}-"))
    if target == "reader":
        for path in CORPUS.glob("*.bsmtp"):
            (seeds / path.name).write_bytes(path.read_bytes())
    elif target == "reply":
        (seeds / "ehlo").write_bytes(b"220 hi\r\n250-x\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
    else:
        for i, line in enumerate(["QUERY ID1", "FLUSH DEST d.test", "TRACE ALL", "HOLD ID2"]):
            (seeds / str(i)).write_bytes(line.encode())
    argv = [sys.argv[0], str(seeds), f"-artifact_prefix={crash_dir}/", "-max_len=4096"]
    if runs:
        argv.append(f"-runs={runs}")
    if seconds:
        argv.append(f"-max_total_time={int(seconds)}")
    crash_dir.mkdir(parents=True, exist_ok=True)
    atheris.instrument_all()
    atheris.Setup(argv, one)
    atheris.Fuzz()  # exits the process
    return 0


# -- big files ---------------------------------------------------------------------------------


def write_big(path: Path, kind: str) -> None:
    with open(path, "wb", buffering=1 << 20) as out:
        out.write(b"EHLO big.test\r\n")
        if kind == "recipients":
            out.write(b"MAIL FROM:<a@big.test>\r\n")
            for i in range(1_000_000):
                out.write(b"RCPT TO:<r%d@dest.test>\r\n" % i)
            out.write(b"DATA\r\nSubject: big\r\n\r\nhello\r\n.\r\n")
        else:
            for i in range(100_000):
                out.write(
                    b"MAIL FROM:<a@big.test>\r\nRCPT TO:<r%d@dest.test>\r\nDATA\r\n"
                    b"Subject: %d\r\n\r\nhello\r\n.\r\n" % (i, i)
                )
        out.write(b"QUIT\r\n")


def read_big(path: Path) -> dict[str, Any]:
    """Read one file as the worker does (envfile.read); run in a child so RSS is its own."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    env = envfile.read(path, LIMITS, "mx.big", max_file_bytes=1 << 40)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mib": round(base / 1024, 1),
        "transactions": len(env.transactions),
        "recipients": sum(len(t.recipients) for t in env.transactions),
        "response_entries": len(env.response),
    }


def run_big() -> int:
    with tempfile.TemporaryDirectory(prefix="spoolsmtp-big-") as tmp:
        for kind, name in (("recipients", "1M-recipients"), ("transactions", "100k-tx")):
            path = Path(tmp) / f"{name}.bsmtp"
            write_big(path, kind)
            child = subprocess.run(
                [sys.executable, __file__, "--read-big", str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                print(f"{name}: reader failed: {child.stderr.strip()[-500:]}")
                return 1
            print(child.stdout.strip())
            os.unlink(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", choices=sorted(TARGETS))
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--engine", choices=["atheris", "hypothesis"], default=None)
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument(
        "--no-chunking", action="store_true", help="reader: skip the chunking invariant"
    )
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--read-big", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.read_big:
        print(json.dumps(read_big(args.read_big)))
        return 0
    if args.big:
        return run_big()
    if not args.target:
        ap.error("--target or --big is required")
    if not args.runs and not args.seconds:
        args.runs = 10_000
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    if args.no_chunking:
        TARGETS["reader"] = functools.partial(target_reader, chunks=False)
    run = run_atheris if engine == "atheris" else run_hypothesis
    return run(args.target, args.runs, args.seconds, args.crash_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
