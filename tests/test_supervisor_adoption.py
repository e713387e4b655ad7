"""A supervisor's delivery process adopting a dead node: the retry schedule stays the
supervisor's. The adoption tells the supervisor that deferred/ may hold retries it does not
know of; it schedules those, once each, and leaves alone the retries it has handed to a
process (found by review: the adopter reported the whole deferred/ queue back as its own,
the supervisor forgot which process it had handed a retry to and handed it to a second one).

Real processes on one spool: a supervisor with two delivery processes, a worker of another
host killed with SIGKILL, a scripted SMTP server on loopback that counts every RCPT.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections import Counter
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from tests.helpers import draft
from tests.smtpservers import RawServer, Script, SmtpServer, read_line
from tests.supervised import children_of
from tests.workerproc import WorkerProcess, wait_for

LATER = "later@example.org"  # answered 450 at every RCPT: it stays queued


class Sink:
    """An SMTP server that answers 450 to every RCPT of ``LATER``, holds the final reply of a
    message to an address in ``gates`` until that gate opens, and counts RCPTs by address."""

    def __init__(self, gated: list[str]) -> None:
        self.gates = {address: threading.Event() for address in gated}
        self.rcpts: Counter[str] = Counter()
        self.holding: set[str] = set()
        self.server = RawServer(self._script)
        self.port = self.server.port

    async def _script(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.test ready\r\n")
        accepted: list[str] = []
        while True:
            await writer.drain()
            line = await read_line(reader)
            verb = line[:4].upper()
            if verb == b"MAIL":
                accepted = []
                writer.write(b"250 ok\r\n")
            elif verb == b"RCPT":
                found = re.search(rb"<([^>]*)>", line)
                address = found.group(1).decode() if found else ""
                self.rcpts[address] += 1
                if address == LATER:
                    writer.write(b"450 4.2.1 try later\r\n")
                else:
                    accepted.append(address)
                    writer.write(b"250 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                for address in accepted:
                    if address in self.gates:
                        self.holding.add(address)
                        await asyncio.get_running_loop().run_in_executor(
                            None, self.gates[address].wait, 60
                        )
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:  # EHLO, RSET, NOOP
                writer.write(b"250 ok\r\n")

    def stop(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.server.stop()


def on_spool(tmp_path: Path, name: str, port: int, **settings: Any) -> WorkerProcess:
    """A worker (or supervisor) with its config and log in ``tmp_path/name``, on the shared
    spool ``tmp_path/spool``."""
    root = tmp_path / name
    root.mkdir()
    spool = {"path": str(tmp_path / "spool"), **settings.pop("spool", {})}
    # a reply the server holds back is waited for as long as the test holds it
    phases = ("connect", "greeting", "ehlo", "mail", "rcpt", "data", "data_block")
    delivery = {"timeouts": {**dict.fromkeys(phases, "3s"), "data_end": "90s"}}
    settings = {"smarthost": f"127.0.0.1:{port}", "spool": spool, "delivery": delivery, **settings}
    worker = WorkerProcess(root, settings)
    worker.spool = tmp_path / "spool"
    return worker


def node_pids(supervisor: WorkerProcess) -> dict[str, int]:
    """The supervisor's delivery processes by node name, once both run."""
    assert supervisor.proc is not None
    pid = supervisor.proc.pid

    def nodes() -> dict[str, int]:
        found = {}
        for child in children_of(pid):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            found[argv[argv.index(b"--node") + 1].decode()] = child
        return found

    named: dict[str, int] = wait_for(lambda: len(now := nodes()) == 2 and now, what="2 processes")
    return named


def holds(active: Path, rcpt: str) -> bool:
    """Does a node's active/ hold an envelope to ``rcpt``?"""
    return any(rcpt.encode() in p.read_bytes() for p in active.iterdir() if p.is_file())


def next_attempt(rec: dict[str, Any]) -> float:
    return min(
        datetime.fromisoformat(r["next_attempt_at"].replace("Z", "+00:00")).timestamp()
        for t in rec["transactions"]
        for r in t["recipients"]
        if r.get("next_attempt_at")
    )


def attempts(rec: dict[str, Any] | None) -> int:
    return 0 if rec is None else int(rec["transactions"][0]["recipients"][0]["attempts"])


def test_a_retry_handed_to_a_process_stays_its_own_when_another_adopts_a_dead_node(
    tmp_path: Path,
) -> None:
    """local.1 has been handed the retry of a deferred envelope and has not taken it yet (its
    one slot is busy); local.2 adopts a dead host meanwhile. The supervisor still knows the
    retry is local.1's: QUERY shows it active, HOLD reaches local.1, and no second process
    is handed it (the envelope is tried once more, not twice)."""
    one, two = "one@example.org", "two@example.org"
    sink = Sink([one, two])
    x = on_spool(tmp_path, "x", sink.port, worker={"host_id": "x"})
    sup = on_spool(
        tmp_path,
        "sup",
        sink.port,
        worker={"processes": 2},
        spool={"max_active": 2, "rescan_interval": "1h"},  # one slot each; no periodic sweep
        retry={"interval": "1s"},
    )
    try:
        # a host that has worked on this spool, idle now, later killed: a dead node
        x.start().drop_drafts("x.bsmtp", [draft("o@example.com", ["x@example.org"])])
        wait_for(lambda: x.final("x.bsmtp"), what="delivered by host x")
        assert x.ask("SUSPEND")["status"] == 200
        sup.start()
        pids = node_pids(sup)
        sup.drop_drafts("job.bsmtp", [draft("o@example.com", [LATER])])
        rec = wait_for(lambda: sup.in_state("job.bsmtp", "deferred"), what="deferred")
        envelope_id = rec["id"]
        assert sup.ask(f"HOLD {envelope_id}")["status"] == 200
        held = wait_for(lambda: sup.in_state("job.bsmtp", "held"), what="held")
        tried = sink.rcpts[LATER]
        # each process busy with one message whose reply the server holds
        sup.drop_drafts("one.bsmtp", [draft("o@example.com", [one])])
        sup.drop_drafts("two.bsmtp", [draft("o@example.com", [two])])
        wait_for(lambda: sink.holding == {one, two}, what="both processes busy")
        mine = one if holds(sup.spool / "nodes" / "local.1" / "active", one) else two
        # its retry is due by its record; released, it is handed to local.1 (the first of
        # two equally loaded), which cannot take it yet
        wait_for(lambda: time.time() > next_attempt(held), what="the retry due")
        assert sup.ask(f"RELEASE {envelope_id}")["status"] == 200
        deferred = sup.spool / "deferred" / f"{envelope_id}.bsmtp"
        wait_for(
            lambda: sup.ask(f"QUERY {envelope_id}")["result"]["state"] == "active",
            what="the retry handed out",
        )
        assert deferred.exists(), "handed out, not taken"

        x.kill()  # SIGKILL: its node's lock is free, its journal left behind
        adopted = sup.ask("ADOPT x")
        state = sup.ask(f"QUERY {envelope_id}")["result"]["state"]
        hold = sup.ask(f"HOLD {envelope_id}")
        sink.gates[mine].set()  # local.1 takes the retry now
        after = wait_for(
            lambda: (
                (r := sup.record_for("job.bsmtp"))
                and r["state"] in ("held", "deferred")
                and attempts(r) > attempts(held)
                and r
            ),
            what="local.1's attempt over",
        )
        for gate in sink.gates.values():
            gate.set()
        wait_for(lambda: sup.final("one.bsmtp") and sup.final("two.bsmtp"), what="both done")
        assert sup.stop() == 0  # everything handed out is finished
    finally:
        x.kill()
        sup.kill()
        sink.stop()
    assert pids["local.1"] != pids["local.2"]
    assert state == "active", "the retry handed to local.1 is still shown as being delivered"
    assert hold["status"] == 200, hold
    assert hold["result"]["messages"] == [
        f"{envelope_id} is being delivered; it will be held after this attempt"
    ]
    assert after["state"] == "held", "HOLD reached the process that had the retry"
    assert sink.rcpts[LATER] == tried + 1, "tried once more, by one process"
    assert (sup.spool / "hold" / f"{envelope_id}.bsmtp").exists()
    assert adopted["status"] == 200, adopted
    assert adopted["result"] == {"node": "x", "envelopes": 0, "deferred": 0}, adopted


def test_a_dead_hosts_deferred_mail_is_scheduled_once_by_a_supervisor_that_adopts_it(
    tmp_path: Path,
) -> None:
    """Host b (a worker) defers two envelopes the supervisor of host a does not know of, and
    is killed; a's periodic check adopts b: a schedules b's two retries, not its own queue
    again, once each, and a second ADOPT finds nothing new."""
    mine, theirs = "k@example.org", ["d1@example.org", "d2@example.org"]
    srv = SmtpServer(Script(defer_first=dict.fromkeys([mine, *theirs], 1)))
    a = on_spool(
        tmp_path,
        "a",
        srv.port,
        worker={"host_id": "a", "processes": 2},
        spool={"rescan_interval": "300ms"},
        retry={"interval": "1h"},
    )
    b = on_spool(tmp_path, "b", srv.port, worker={"host_id": "b"}, retry={"interval": "1h"})
    try:
        a.start()
        assert a.ask("SUSPEND")["status"] == 200  # b takes the next files
        b.start()
        for i, rcpt in enumerate(theirs):
            b.drop_drafts(f"d{i}.bsmtp", [draft("o@example.com", [rcpt])])
        for i in range(len(theirs)):
            wait_for(partial(b.in_state, f"d{i}.bsmtp", "deferred"), what="deferred by b")
        assert b.ask("SUSPEND")["status"] == 200
        assert a.ask("RESUME")["status"] == 200
        a.drop_drafts("k.bsmtp", [draft("o@example.com", [mine])])
        wait_for(lambda: a.in_state("k.bsmtp", "deferred"), what="deferred by a")
        b.kill()
        assert b.proc is not None and b.proc.returncode == -signal.SIGKILL
        wait_for(lambda: "adopted node b:" in a.log.read_text(), what="b adopted by a")
        again = a.ask("ADOPT b")
        queued = a.ask("QUERY")["result"]["states"]["deferred"]
        flushed = a.ask("FLUSH")["result"]["scheduled"]
        for name in ("d0.bsmtp", "d1.bsmtp", "k.bsmtp"):
            wait_for(partial(a.final, name), what=f"{name} delivered")
        assert a.stop() == 0
    finally:
        a.kill()
        b.kill()
        srv.stop()
    log = a.log.read_text().splitlines()
    lines = [line for line in log if " WARNING adopted node b:" in line]
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        "adopted node b: 0 envelope(s) in flight resumed here, 2 retries scheduled"
    )
    assert again["status"] == 200 and again["result"]["deferred"] == 0, again
    assert queued == 3 and flushed == 3
    got = Counter(r for m in srv.messages for r in m.rcpt_tos)
    assert got == Counter([mine, *theirs]), got
    for name in ("d0.bsmtp", "d1.bsmtp", "k.bsmtp"):
        assert attempts(a.record_for(name)) == 2, name


def test_a_dead_hosts_retries_are_known_while_the_adopter_waits_for_room(tmp_path: Path) -> None:
    """Host x dies with one envelope in flight and one deferred. The process that adopts it
    moves the first into its area, then waits for a free slot to resume it; the supervisor
    knows x's deferred envelope already, and still does after that process is killed in the
    meantime (it used to be told only once the adopter had found room)."""
    inflight, one, two = "inflight@example.org", "one@example.org", "two@example.org"
    sink = Sink([inflight, one, two])
    x = on_spool(tmp_path, "x", sink.port, worker={"host_id": "x"}, retry={"interval": "1h"})
    sup = on_spool(
        tmp_path,
        "sup",
        sink.port,
        worker={"processes": 2},
        spool={"max_active": 2, "rescan_interval": "1h"},  # one slot each; no periodic sweep
        retry={"interval": "1h"},
    )
    result: list[dict[str, Any]] = []
    try:
        sup.start()
        pids = node_pids(sup)
        assert sup.ask("SUSPEND")["status"] == 200  # x takes the next files
        x.start().drop_drafts("d.bsmtp", [draft("o@example.com", [LATER])])
        wait_for(lambda: x.in_state("d.bsmtp", "deferred"), what="deferred by x")
        x.drop_drafts("g.bsmtp", [draft("o@example.com", [inflight])])
        wait_for(lambda: inflight in sink.holding, what="x's envelope in flight")
        x.kill()
        assert sup.ask("RESUME")["status"] == 200
        # one after the other: the names of x's files, seen during the SUSPEND and handed out
        # at RESUME, are done with (x took the files) by the time the first is at the server,
        # so the second goes to the idle process, not behind the first in the busy one
        sup.drop_drafts("one.bsmtp", [draft("o@example.com", [one])])
        wait_for(lambda: one in sink.holding, what="one process busy")
        sup.drop_drafts("two.bsmtp", [draft("o@example.com", [two])])
        wait_for(lambda: {one, two} <= sink.holding, what="both processes busy")

        def adopt() -> None:  # answered once the adopter has resumed what it moved
            try:
                result.append(sup.ask("ADOPT x"))
            except OSError as exc:
                result.append({"error": str(exc)})

        adopting = threading.Thread(target=adopt)
        adopting.start()
        area = sup.spool / "nodes" / "x"
        wait_for(
            lambda: (
                not list((area / "active").iterdir()) and not list((area / "journal").glob("*.log"))
            ),
            what="x's area taken",
        )
        wait_for(
            lambda: sup.ask("QUERY")["result"]["states"]["deferred"] == 1,
            what="x's deferred envelope known to the supervisor",
        )
        taker = next(n for n in pids if holds(sup.spool / "nodes" / n / "active", inflight))
        os.kill(pids[taker], signal.SIGKILL)  # before it found room for x's envelope
        adopting.join(60)
        for gate in sink.gates.values():
            gate.set()
        for name in ("g.bsmtp", "one.bsmtp", "two.bsmtp"):
            wait_for(partial(sup.final, name), what=f"{name} delivered")
        queued = sup.ask("QUERY")["result"]["states"]["deferred"]
        flushed = sup.ask("FLUSH")["result"]["scheduled"]
        wait_for(lambda: attempts(sup.record_for("d.bsmtp")) == 2, what="x's retry tried here")
        assert sup.stop() == 0
    finally:
        x.kill()
        sup.kill()
        sink.stop()
    assert not adopting.is_alive() and result, "ADOPT answered when its process died"
    assert queued == 1 and flushed == 1
    assert sink.rcpts[LATER] == 2
