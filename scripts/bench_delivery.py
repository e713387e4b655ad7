"""Benchmark of the delivery path: N envelopes (1 recipient, 2 KB) sent to a local sink.

Reports messages/s and CPU seconds per 1,000 messages (this process only; the sink runs in its
own process), with and without connection reuse and PIPELINING. Usage:

    .venv/bin/python scripts/bench_delivery.py [-n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from spoolsmtp.bsmtp import writer
from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model import config
from spoolsmtp.model.envelope import Recipient
from spoolsmtp.model.outcome import Status
from spoolsmtp.spool import envfile

BODY = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(cfg: config.Config, path: Path, count: int) -> tuple[float, float]:
    env = envfile.read(path, cfg.limits, cfg.helo_name)
    tx = env.transactions[0]
    deliverer = Deliverer(cfg, MxResolver(cfg.dns))
    now = datetime.now(UTC)
    start, start_cpu = time.perf_counter(), cpu()
    for i in range(count):
        (res,) = await deliverer.deliver(path, tx, f"B{i}", now)
        assert res.status is Status.DELIVERED, res
    elapsed, used = time.perf_counter() - start, cpu() - start_cpu
    await deliverer.close_all()
    return elapsed, used


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5000)
    args = parser.parse_args()
    sink = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("sink.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None and sink.stdin is not None
    port = int(sink.stdout.readline().split()[1])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.bsmtp"
            draft = writer.Draft("bench@example.com", (Recipient("sink@example.org"),), BODY)
            path.write_bytes(writer.render([draft], "bench.example"))
            print(f"{'reuse':6} {'pipelining':10} {'messages':>9} {'msg/s':>8} {'CPU s/1000':>11}")
            for reuse, pipelining in ((True, True), (True, False), (False, True), (False, False)):
                data = {
                    "hostname": "bench.example",
                    "smarthost": f"127.0.0.1:{port}",
                    "delivery": {"reuse_connections": reuse, "pipelining": pipelining},
                }
                cfg = config.parse(yaml.safe_dump(data), "bench")
                count = args.n if reuse else max(args.n // 5, 200)
                elapsed, used = asyncio.run(run(cfg, path, count))
                print(
                    f"{reuse!s:6} {pipelining!s:10} {count:9d} {count / elapsed:8.0f} "
                    f"{used / count * 1000:11.2f}"
                )
    finally:
        sink.stdin.close()
        sink.wait(10)


if __name__ == "__main__":
    main()
