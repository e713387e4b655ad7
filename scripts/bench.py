"""Whole-pipeline benchmark: envelopes dropped into incoming/ until every result is final.

The worker runs as its own process (`spoolsmtp run`) with fsync on, against the local sink
(scripts/sink.py, another process). Reported: envelopes/s, drop-to-final latency p50/p99
(from the rename into incoming/ to the final result record), the worker's CPU seconds per
1,000 envelopes and its peak RSS (from wait4). Cases:

* ``idle``: envelopes dropped one at a time, each after the previous is final (latency when idle);
* ``burst``: N envelopes (1 recipient, 2 KB) dropped as fast as possible;
* ``backlog``: N envelopes already in incoming/ when the worker starts (time to first delivery).

    .venv/bin/python scripts/bench.py [--burst 10000] [--backlog 100000] [--idle 200]
                                      [--event-loop auto|asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from spoolsmtp.bsmtp import writer
from spoolsmtp.model.envelope import Recipient

BODY = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26
ROOT = Path(__file__).resolve().parent.parent


def envelope(i: int) -> bytes:
    draft = writer.Draft("bench@example.com", (Recipient(f"r{i}@example.org"),), BODY)
    return writer.render([draft], "bench.example")


def count(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if not e.name.startswith("."))


class Run:
    def __init__(self, tmp: Path, port: int, event_loop: str) -> None:
        self.spool = tmp / "spool"
        self.incoming = self.spool / "incoming"
        self.incoming.mkdir(parents=True)
        conf = {
            "hostname": "bench.example",
            "smarthost": f"127.0.0.1:{port}",
            "log_level": "warning",
            "event_loop": event_loop,
            "spool": {"path": str(self.spool)},
        }
        self.config = tmp / "conf.yaml"
        self.config.write_text(yaml.safe_dump(conf))
        self.dropped: dict[str, float] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def drop(self, i: int) -> None:
        name = f"b{i:06d}.bsmtp"
        tmp = self.incoming / f".{name}"
        tmp.write_bytes(envelope(i))
        self.dropped[name] = time.time()
        tmp.rename(self.incoming / name)

    def start(self) -> None:
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spoolsmtp", "run", "--config", str(self.config)],
            cwd=ROOT,
        )

    def wait_done(self, n: int) -> None:
        """Until ``n`` envelopes are in done/. Listing a folder of 100,000 names costs tens of
        ms of the CPU the worker is measured on: the pause between looks is twenty times the
        last look's cost, so this polling never takes more than 5% of a core. The times
        reported come from the result records, not from when this loop noticed."""
        done = self.spool / "done"
        while True:
            cost = time.process_time()
            have = count(done) if done.exists() else 0
            cost = time.process_time() - cost
            if have >= n:
                return
            time.sleep(max(0.02, 20 * cost))

    def stop(self) -> tuple[float, float]:
        """SIGTERM the worker; its CPU seconds and peak RSS in MB."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = 0
        return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024

    def finals(self) -> dict[str, float]:
        """When each envelope's final result record was made (epoch seconds), by source name."""
        out = {}
        for path in (self.spool / "results").glob("*.json"):
            rec = json.loads(path.read_bytes())
            final = time.mktime(time.strptime(rec["updated_at"][:19], "%Y-%m-%dT%H:%M:%S"))
            final += float("0" + rec["updated_at"][19:-1]) - time.timezone
            out[rec["source"]] = final
        return out

    def latencies(self, finals: dict[str, float]) -> list[float]:
        return sorted(final - self.dropped[source] for source, final in finals.items())


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "sink.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None and sink.stdin is not None
    port = int(sink.stdout.readline().split()[1])
    rows: list[tuple[str, int, float | None, list[float] | None, float, float, float | None]] = []
    # One folder for all cases, removed at the very end: ext4 without a journal (this
    # machine's disk) skips inodes freed in the last 30 s when it allocates one, so deleting a
    # finished case's 30,000 files would slow down every file the next case creates.
    outer = tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench-")
    try:
        if args.idle:
            run = Run(Path(outer.name) / "idle", port, args.event_loop)
            run.start()
            time.sleep(1.0)  # let it start before the first drop: we measure idle latency
            for i in range(args.idle):
                run.drop(i)
                run.wait_done(i + 1)
            cpu, rss = run.stop()
            lat = run.latencies(run.finals())
            rows.append(("idle, one at a time", args.idle, None, lat, cpu, rss, None))
        if args.burst:
            run = Run(Path(outer.name) / "burst", port, args.event_loop)
            run.start()
            time.sleep(1.0)
            start = time.time()
            for i in range(args.burst):
                run.drop(i)
            run.wait_done(args.burst)
            cpu, rss = run.stop()
            finals = run.finals()
            end = max(finals.values())
            rate = args.burst / (end - start)
            rows.append(("burst", args.burst, rate, run.latencies(finals), cpu, rss, None))
        if args.backlog:
            run = Run(Path(outer.name) / "backlog", port, args.event_loop)
            for i in range(args.backlog):
                run.drop(i)
            run.start()
            run.wait_done(args.backlog)
            cpu, rss = run.stop()
            finals = run.finals()
            first, end = min(finals.values()), max(finals.values())
            rate = args.backlog / (end - run.started)
            delay = first - run.started
            rows.append(("backlog at start", args.backlog, rate, None, cpu, rss, delay))
    finally:
        sink.stdin.close()
        sink.wait(10)
        outer.cleanup()
    print(f"event loop: {args.event_loop} (auto: uvloop where installed)")
    heads = ("N", "env/s", "p50 ms", "p99 ms", "CPU s/1000", "peak RSS MB", "first s")
    print(f"{'case':22} " + " ".join(f"{h:>{max(7, len(h))}}" for h in heads))
    for label, n, rate, latencies, cpu, rss, first_s in rows:
        lat = latencies or []
        p50 = f"{quantile(lat, 0.5) * 1000:7.1f}" if lat else "      -"
        p99 = f"{quantile(lat, 0.99) * 1000:7.1f}" if lat else "      -"
        r = f"{rate:7.0f}" if rate else "      -"
        f = f"{first_s:7.2f}" if first_s is not None else "      -"
        print(f"{label:22} {n:7d} {r} {p50} {p99} {cpu / n * 1000:10.2f} {rss:11.1f} {f}")


if __name__ == "__main__":
    main()
