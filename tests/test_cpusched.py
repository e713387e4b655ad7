"""The supervisor runs under SCHED_BATCH, so that its wake-ups (one per batch its processes
send, one per name the watcher sees) do not preempt a delivery process; the delivery
processes run under the policy the supervisor was started with (systemd's
``CPUSchedulingPolicy=``, ``chrt``), also after one is killed and started again. A policy
other than SCHED_OTHER and SCHED_BATCH is the starter's choice and is left alone."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import pytest

from tests.smtpservers import SmtpServer
from tests.supervised import alive, children_of, delivered, drop_burst, supervised, two_children
from tests.workerproc import WorkerProcess, wait_for


def policies(pid: int) -> set[int]:
    """The policy of every thread of ``pid`` (a thread that ends meanwhile is left out)."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            found.add(os.sched_getscheduler(int(tid)))
    return found


def start(tmp_path: Path, srv: SmtpServer, policy: int) -> tuple[WorkerProcess, int, list[int]]:
    """The worker started from a thread of its own under ``policy`` (a process inherits the
    policy of the thread that forked it), so that pytest's own thread is never changed: an
    unprivileged one could not come back from SCHED_IDLE."""
    worker = supervised(tmp_path, srv.port)
    failed: list[BaseException] = []

    def starter() -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
            worker.start()
        except BaseException as exc:  # re-raised in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=starter)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    assert worker.proc is not None
    return worker, worker.proc.pid, two_children(worker)


@pytest.mark.parametrize(
    ("started", "supervisor", "delivery"),
    [
        (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_OTHER),  # the default: the supervisor yields
        (os.SCHED_BATCH, os.SCHED_BATCH, os.SCHED_BATCH),  # batch for the whole service
        (os.SCHED_IDLE, os.SCHED_IDLE, os.SCHED_IDLE),  # another policy: left as it was
    ],
    ids=["other", "batch", "idle"],
)
def test_the_supervisor_yields_and_its_processes_keep_the_policy_it_was_started_with(
    tmp_path: Path, started: int, supervisor: int, delivery: int
) -> None:
    srv = SmtpServer()
    worker, pid, kids = start(tmp_path, srv, started)
    try:
        assert policies(pid) == {supervisor}
        wait_for(lambda: all(policies(k) == {delivery} for k in kids), what="their policy")
        names = drop_burst(worker, 6)
        wait_for(lambda: sum(delivered(srv).values()) >= len(names), what="all delivered")
    finally:
        assert worker.stop() == 0
        srv.stop()


def test_a_process_started_again_delivers_under_the_first_policy(tmp_path: Path) -> None:
    """kill -9 of a delivery process: the supervisor (under SCHED_BATCH by now) starts it
    again, and the new one goes back to SCHED_OTHER rather than inherit the batch policy."""
    srv = SmtpServer()
    worker, pid, kids = start(tmp_path, srv, os.SCHED_OTHER)
    try:
        os.kill(kids[0], signal.SIGKILL)
        wait_for(lambda: not alive(kids[0]), what="the process gone")
        again = wait_for(
            lambda: [k for k in children_of(pid) if k not in kids], what="the process started again"
        )
        wait_for(lambda: policies(again[0]) == {os.SCHED_OTHER}, what="its policy")
        assert policies(pid) == {os.SCHED_BATCH}
    finally:
        assert worker.stop() == 0
        srv.stop()


def test_after_reboot_the_processes_still_deliver_under_the_first_policy(tmp_path: Path) -> None:
    """REBOOT re-executes the supervisor, and a process keeps its policy across exec: the
    supervisor goes back to the policy it was started with before it does, or the new one
    would take SCHED_BATCH for the policy it was started with and pass it on (found by
    review)."""
    srv = SmtpServer()
    worker, pid, kids = start(tmp_path, srv, os.SCHED_OTHER)
    try:
        assert worker.ask("REBOOT")["status"] == 200
        wait_for(
            lambda: worker.readies() == 2 and worker.answers(),
            what="the re-executed supervisor",
        )
        after = two_children(worker)
        assert set(after).isdisjoint(kids)
        wait_for(lambda: all(policies(k) == {os.SCHED_OTHER} for k in after), what="their policy")
        assert policies(pid) == {os.SCHED_BATCH}
    finally:
        assert worker.stop() == 0
        srv.stop()
