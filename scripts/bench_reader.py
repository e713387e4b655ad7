"""Benchmark of the envelope reader: read throughput (MB/s) and peak RSS per case.

Cases: one message of 1 KB, 1 MB and 200 MB, and a file of 10,000 small transactions. Each case
is read in a fresh child process so its peak RSS is its own. Usage:

    .venv/bin/python scripts/bench_reader.py [--repeat N] [--big-mb 200]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spoolsmtp.model.config import Limits
from spoolsmtp.spool import envfile

HEAD = (
    b"HELO bench.example\r\nMAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n"
)
LINE = b"The quick brown fox jumps over the lazy dog; 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ.\r\n"


def make_message(path: Path, size: int) -> None:
    block = LINE * 4096
    with open(path, "wb") as fh:
        fh.write(HEAD + b"Subject: bench\r\n\r\n")
        left = size
        while left >= len(block):
            fh.write(block)
            left -= len(block)
        fh.write(LINE * (left // len(LINE)) + b".\r\nQUIT\r\n")


def make_many(path: Path, count: int) -> None:
    with open(path, "wb") as fh:
        fh.write(b"HELO bench.example\r\n")
        for i in range(count):
            fh.write(
                b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<r%d@example.org>\r\nDATA\r\n"
                b"Subject: %d\r\n\r\n" % (i, i) + LINE * 3 + b".\r\n"
            )
        fh.write(b"QUIT\r\n")


def one(path: Path) -> dict[str, float]:
    """Read the file once in this process; report seconds and peak RSS."""
    limits = Limits(max_message_bytes=1000**3, recipients=1000)
    start = time.perf_counter()
    env = envfile.read(path, limits, "bench.example", max_file_bytes=2 * 1000**3)
    seconds = time.perf_counter() - start
    assert env.accepted, env.errors[:3]
    return {
        "seconds": seconds,
        "bytes": path.stat().st_size,
        "transactions": len(env.transactions),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[str, Path]] = []
        for label, size in (
            ("1 KB", 1000),
            ("1 MB", 1000**2),
            (f"{args.big_mb} MB", args.big_mb * 1000**2),
        ):
            path = Path(tmp) / f"m{size}.bsmtp"
            make_message(path, size)
            cases.append((f"one message, {label}", path))
        many = Path(tmp) / "many.bsmtp"
        make_many(many, 10_000)
        cases.append(("10,000 transactions", many))
        print(f"{'case':28} {'file MB':>9} {'MB/s':>8} {'seconds':>8} {'peak RSS MB':>12}")
        for label, path in cases:
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run(
                    [sys.executable, __file__, "--one", str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(out.stdout))
            best = min(runs, key=lambda r: r["seconds"])
            mb = best["bytes"] / 1000**2
            rss = max(r["peak_rss_mb"] for r in runs)
            rate = mb / best["seconds"] if best["seconds"] > 0 else float("inf")
            print(f"{label:28} {mb:9.3f} {rate:8.1f} {best['seconds']:8.4f} {rss:12.1f}")


if __name__ == "__main__":
    main()
