"""A worker alone whose every slot is busy: a retry that has fallen due waits for a slot, out
of the schedule and still in deferred/. It is not scheduled a second time by an adoption of a
dead node (which schedules only what deferred/ holds that the worker does not know of), and
the queue does not forget it when the operator holds it meanwhile and the retry then finds it
gone from deferred/.

Real processes: a worker with one slot, a host killed with SIGKILL, a scripted SMTP server.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import draft
from tests.test_supervisor_adoption import LATER, Sink, on_spool
from tests.workerproc import WorkerProcess, wait_for

BUSY = "busy@example.org"


def one_slot(tmp_path: Path, sink: Sink) -> WorkerProcess:
    return on_spool(
        tmp_path,
        "w",
        sink.port,
        spool={"max_active": 1, "rescan_interval": "1h"},  # one slot; no periodic sweep
        retry={"interval": "1h"},
    )


def waiting_retry(w: WorkerProcess, sink: Sink) -> str:
    """An envelope whose retry is due and waits for the worker's one slot, held by a message
    whose reply the server keeps back; its id."""
    w.drop_drafts("job.bsmtp", [draft("o@example.com", [LATER])])
    envelope_id: str = wait_for(lambda: w.in_state("job.bsmtp", "deferred"), what="deferred")["id"]
    assert w.ask(f"HOLD {envelope_id}")["status"] == 200
    w.drop_drafts("busy.bsmtp", [draft("o@example.com", [BUSY])])
    wait_for(lambda: sink.holding == {BUSY}, what="the one slot busy")
    assert w.ask(f"RELEASE {envelope_id}")["status"] == 200  # due at once
    return envelope_id


def its_turn(w: WorkerProcess, sink: Sink) -> None:
    """Free the slot; once the next file is delivered, the waiting retry has had its turn
    (the slot is waited for in turn)."""
    sink.gates[BUSY].set()
    w.drop_drafts("after.bsmtp", [draft("o@example.com", ["after@example.org"])])
    wait_for(lambda: w.final("after.bsmtp"), what="the next file delivered")


def test_an_adoption_does_not_schedule_again_a_retry_waiting_for_a_slot(tmp_path: Path) -> None:
    sink = Sink([BUSY])
    x = on_spool(tmp_path, "x", sink.port, worker={"host_id": "x"})
    w = one_slot(tmp_path, sink)
    try:
        # a host that has worked on this spool, idle now, later killed: a dead node
        x.start().drop_drafts("x.bsmtp", [draft("o@example.com", ["x@example.org"])])
        wait_for(lambda: x.final("x.bsmtp"), what="delivered by host x")
        assert x.ask("SUSPEND")["status"] == 200
        w.start()
        waiting_retry(w, sink)
        x.kill()
        adopted = w.ask("ADOPT x")
        its_turn(w, sink)
        assert w.stop() == 0
    finally:
        x.kill()
        w.kill()
        sink.stop()
    assert adopted["status"] == 200, adopted
    assert adopted["result"]["deferred"] == 0, "the waiting retry is not scheduled again"
    assert sink.rcpts[LATER] == 2, "tried once more"


def test_a_retry_held_while_it_waits_for_a_slot_stays_in_the_queue(tmp_path: Path) -> None:
    sink = Sink([BUSY])
    w = one_slot(tmp_path, sink)
    try:
        w.start()
        envelope_id = waiting_retry(w, sink)
        held = w.ask(f"HOLD {envelope_id}")
        its_turn(w, sink)
        states = w.ask("QUERY")["result"]["states"]
        tried = sink.rcpts[LATER]
        released = w.ask(f"RELEASE {envelope_id}")
        assert w.stop() == 0
    finally:
        w.kill()
        sink.stop()
    assert held["result"]["messages"] == [f"{envelope_id} held"], held
    assert tried == 1, "not retried while held"
    assert states["held"] == 1, "still listed as held"
    assert released["status"] == 200, released
