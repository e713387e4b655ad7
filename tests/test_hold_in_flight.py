"""HOLD of an envelope being delivered ("it will be held after this attempt") survives a
kill -9 of the process delivering it: the attempt resumed after the restart ends held, not
deferred. Before, the promise lived in memory only (found by an operator trial), for a worker
alone and for a supervisor's delivery process."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import draft
from tests.smtpservers import RawServer, standard_dialogue
from tests.supervised import TWO, two_children
from tests.workerproc import WorkerProcess, request, wait_for


def _later_server(gate: threading.Event, held: list[int]) -> RawServer:
    """Answers every recipient 451; the first try of each only once ``gate`` opens."""
    tries: Counter[bytes] = Counter()

    async def rcpt(line: bytes) -> bytes:
        tries[line] += 1
        if tries[line] == 1:
            held[0] += 1
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
        return b"451 4.3.0 try later\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await standard_dialogue(reader, writer, [], rcpt)

    return RawServer(script)


@pytest.mark.parametrize("processes", [1, 2], ids=["alone", "supervised"])
def test_a_hold_given_in_flight_survives_a_kill(tmp_path: Path, processes: int) -> None:
    gate = threading.Event()
    held = [0]
    srv = _later_server(gate, held)
    settings: dict[str, Any] = {
        "smarthost": f"127.0.0.1:{srv.port}",
        "retry": {"interval": "1h"},
        "delivery": {"timeouts": {"rcpt": "60s"}},
    }
    if processes == 2:
        settings.update(TWO)
    w = WorkerProcess(tmp_path, settings).start()
    again: WorkerProcess | None = None
    try:
        w.drop_drafts("job.bsmtp", [draft("o@example.com", ["a@example.org"])])
        wait_for(lambda: held[0] == 1, what="the first try waiting at the server")
        (rec,) = wait_for(w.records, what="its record")
        answer = request(w.operator_socket, f"HOLD {rec['id']}")
        assert "will be held after this attempt" in answer, answer
        assert w.proc is not None
        if processes == 2:
            for pid in two_children(w):
                os.kill(pid, signal.SIGKILL)
        else:
            w.proc.kill()
            w.proc.wait()
            again = WorkerProcess(tmp_path, settings).start()
        gate.set()
        held_rec = wait_for(lambda: w.in_state("job.bsmtp", "held"), what="held after all")
    finally:
        gate.set()
        for worker in (again, w):
            if worker is not None:
                worker.kill()
        srv.stop()
    assert held_rec["location"].startswith("hold/")
    assert [p.name for p in w.files("hold")] == [f"{rec['id']}.bsmtp"]
    assert w.files("deferred") == []
