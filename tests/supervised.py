"""A supervisor (``worker.processes: 2``) run for tests: its delivery processes found by their
command line, bursts of envelopes, and a sink that holds each DATA until a gate opens."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from tests.helpers import draft
from tests.smtpservers import RawServer, SmtpServer, read_line
from tests.workerproc import WorkerProcess, wait_for

TWO = {"worker": {"processes": 2}}


def children_of(pid: int) -> list[int]:
    """The delivery processes a supervisor started (``spoolsmtp child ... --parent PID``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"child" in argv and b"--parent" in argv[:-1]:
            parent = argv[argv.index(b"--parent") + 1]
            if parent == str(pid).encode():
                found.append(int(entry))
    return sorted(found)


def two_children(worker: WorkerProcess) -> list[int]:
    """The two delivery processes of a started supervisor, once both are running."""
    assert worker.proc is not None
    pid = worker.proc.pid
    kids: list[int] = wait_for(
        lambda: len(now := children_of(pid)) == 2 and now, what="two delivery processes"
    )
    return kids


def holding(worker: WorkerProcess, kids: list[int]) -> None:
    """Wait until both processes hold their nodes, and the supervisor knows it: each logs
    "ready" once it has told the supervisor so ("h"), and a QUERY answered after that needs
    an answer from each, which comes over the same link after the "h"."""
    wait_for(
        lambda: all(f"spoolsmtp[{pid}] INFO ready" in worker.log.read_text() for pid in kids),
        what="both processes ready",
    )
    assert worker.ask("QUERY")["status"] == 200


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def supervised(
    tmp_path: Path, port: int, *, env: dict[str, str] | None = None, **more: Any
) -> WorkerProcess:
    settings: dict[str, Any] = {"smarthost": f"127.0.0.1:{port}", **TWO, **more}
    return WorkerProcess(tmp_path, settings, env=env)


def drop_burst(worker: WorkerProcess, count: int) -> list[str]:
    rcpts = [f"user{i}@example.org" for i in range(count)]
    for i, rcpt in enumerate(rcpts):
        worker.drop_drafts(f"job{i}.bsmtp", [draft("oper@example.com", [rcpt])])
    return rcpts


def delivered(srv: SmtpServer) -> Counter[str]:
    return Counter(r for m in list(srv.messages) for r in m.rcpt_tos)


def all_final(worker: WorkerProcess, count: int) -> bool:
    return sum(1 for r in worker.records() if r["state"] == "done") == count


def gated_sink(gate: threading.Event, live: list[int], peak: list[int]) -> RawServer:
    """A sink that holds each DATA until ``gate`` opens and counts connections at once."""
    received: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        try:
            writer.write(b"220 sink.test ready\r\n")
            while True:
                line = await read_line(reader)
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    received.append(await reader.readuntil(b"\r\n.\r\n"))
                    await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            live[0] -= 1

    server = RawServer(script)
    server.received = received
    return server
