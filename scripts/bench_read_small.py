"""Benchmark of the envelope reader on small envelopes: microseconds of CPU per envelope.

The worker reads each envelope whole (``envfile.read_bytes``) before it delivers it; for small
envelopes the per-command cost of the reader, not its MB/s, is what shows in a profile. Cases
are the benchmark's envelopes (``benchkit.Mail``): 2 KB with 1 and 5 recipients, 100 KB with 5.
Each repeat reads ``--count`` distinct envelopes once and reports the mean per envelope; the
table gives the best and the median of the repeats and their spread (max - min).

``--against DIR`` compares with another copy of the code (``git archive BASE | tar -x -C DIR``):
child processes with ``PYTHONPATH=DIR`` and without alternate, round by round, so a busy spell
of the machine falls on both. Usage:

    .venv/bin/python scripts/bench_read_small.py [--rounds 5] [--repeat 7] [--against DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from benchkit import Mail

CASES = (Mail(2046, 1), Mail(2046, 5), Mail(102400, 5))


def per_envelope(mail: Mail, count: int, repeat: int) -> list[float]:
    """Microseconds per envelope, one figure per repeat, reading ``count`` envelopes each."""
    from spoolsmtp.model.config import Limits
    from spoolsmtp.spool import envfile

    limits = Limits()
    datas = [mail.envelope(i) for i in range(count)]
    for data in datas[:20]:  # warm up, and check the case reads as the worker would have it
        env = envfile.read_bytes(data, "x", limits, "bench.example")
        assert env.accepted, env.errors
    out = []
    for _ in range(repeat):
        start = time.process_time()
        for data in datas:
            envfile.read_bytes(data, "x", limits, "bench.example")
        out.append((time.process_time() - start) / count * 1e6)
    return out


def child(count: int, repeat: int) -> None:
    """Measure every case in this process and print the figures as JSON."""
    print(json.dumps({str(m.args()): per_envelope(m, count, repeat) for m in CASES}))


def run_child(pythonpath: str | None, count: int, repeat: int) -> dict[str, list[float]]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    args = [sys.executable, __file__, "--child", "--count", str(count), "--repeat", str(repeat)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    figures: dict[str, list[float]] = json.loads(out.stdout)
    return figures


def row(label: str, figures: list[float]) -> str:
    best, median = min(figures), statistics.median(figures)
    spread = max(figures) - best
    return f"{label:28} {best:9.1f} {median:9.1f} {spread:9.1f} {len(figures):5}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--against", help="another checkout's root, measured alternately")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.count, args.repeat)
        return
    codes: list[tuple[str, str | None]] = [("this checkout", None)]
    if args.against:
        codes.insert(0, (f"against {args.against}", args.against))
    results: dict[str, dict[str, list[float]]] = {label: {} for label, _ in codes}
    for n in range(args.rounds):
        order = codes if n % 2 == 0 else codes[::-1]
        for label, path in order:
            for case, figures in run_child(path, args.count, args.repeat).items():
                results[label].setdefault(case, []).extend(figures)
    print(f"{'us per envelope':28} {'best':>9} {'median':>9} {'spread':>9} {'runs':>5}")
    for mail in CASES:
        print(f"Mail{tuple(int(a) for a in mail.args())}: {mail}")
        for label, _ in codes:
            print(row(f"  {label}", results[label][str(mail.args())]))


if __name__ == "__main__":
    main()
