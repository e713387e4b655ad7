"""The supervisor's watchdog: a delivery process that answers nothing for ``worker.watchdog``
(stopped, or its event loop stuck) is killed and started again, and the mail it had been
handed is delivered by the processes that answer; the supervisor's own stall is not held
against its processes."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from spoolsmtp.app.children import WATCH_TICK_MAX, Verdict, verdict, watch_tick
from tests.smtpservers import SmtpServer
from tests.supervised import (
    alive,
    all_final,
    children_of,
    delivered,
    drop_burst,
    holding,
    supervised,
    two_children,
)
from tests.workerproc import WorkerProcess, wait_for

QUICK = {"processes": 2, "watchdog": 1.0}


@contextlib.contextmanager
def supervising(
    tmp_path: Path, settings: dict[str, float] = QUICK
) -> Iterator[tuple[WorkerProcess, SmtpServer, int, list[int]]]:
    """A supervisor with ``settings`` as its ``worker:`` section and a sink: the worker, the
    sink, the supervisor's pid and its two processes (holding their nodes); stopped after."""
    srv = SmtpServer()
    worker = supervised(tmp_path, srv.port, worker=settings).start()
    try:
        assert worker.proc is not None
        kids = two_children(worker)
        holding(worker, kids)
        yield worker, srv, worker.proc.pid, kids
    finally:
        assert worker.stop() == 0
        srv.stop()


STALL = 2.5  # how long the supervisor is stopped: more than the watchdog's 1 s


def test_the_verdict_pings_a_quiet_process_and_kills_a_silent_one() -> None:
    assert watch_tick(30.0) == WATCH_TICK_MAX
    assert watch_tick(1.0) == 0.25
    assert verdict(0.1, 1.0) is Verdict.NOTHING  # it spoke within the tick
    assert verdict(0.25, 1.0) is Verdict.PING  # quiet for a tick: ask it something
    assert verdict(0.99, 1.0) is Verdict.PING
    assert verdict(1.0, 1.0) is Verdict.KILL  # quiet for the whole timeout
    assert verdict(3600.0, 0.0) is Verdict.NOTHING  # watchdog: 0 turns it off


def test_a_stopped_process_is_killed_and_what_it_was_handed_is_delivered(
    tmp_path: Path,
) -> None:
    """A delivery process stopped with SIGSTOP (as a wedged loop would be) kept the names it
    had been handed for ever, while the others idled: now the supervisor kills it after
    ``worker.watchdog``, logs it once, starts the slot again, and every envelope is delivered
    exactly once."""
    with supervising(tmp_path) as (worker, srv, sup, kids):
        # the first is stopped for good: on a tie the supervisor hands the next name to the
        # first, so it is handed some of these
        kids.sort(key=lambda pid: b"local.1" not in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(kids[0], signal.SIGSTOP)
        rcpts = drop_burst(worker, 12)
        wait_for(lambda: not alive(kids[0]), what="the stopped process killed")
        fresh = wait_for(
            lambda: len(now := children_of(sup)) == 2 and kids[0] not in now and now,
            what="its slot started again",
        )
        assert kids[1] in fresh
        wait_for(lambda: all_final(worker, 12), what="every envelope delivered")
        assert delivered(srv) == dict.fromkeys(rcpts, 1)
    log = worker.log.read_text()
    assert log.count(f"(pid {kids[0]}) has answered nothing for") == 1, log
    assert "was killed by SIGKILL" not in log  # one line for the episode, not two


def test_a_process_that_answers_is_left_alone(tmp_path: Path) -> None:
    """Busy processes answer the watchdog's pings: a burst delivered under a 1 s watchdog
    kills nobody."""
    with supervising(tmp_path) as (worker, srv, sup, kids):
        rcpts = drop_burst(worker, 40)
        wait_for(lambda: all_final(worker, 40), what="every envelope delivered")
        assert delivered(srv) == dict.fromkeys(rcpts, 1)
        assert children_of(sup) == kids
    assert "has answered nothing" not in worker.log.read_text()


def test_the_supervisors_own_stall_is_not_held_against_its_processes(tmp_path: Path) -> None:
    """The supervisor stopped for longer than the watchdog (SIGSTOP, or starved of CPU) has
    not read what its processes said meanwhile: when it runs again it kills none of them."""
    with supervising(tmp_path) as (worker, srv, sup, kids):
        os.kill(sup, signal.SIGSTOP)
        try:
            time.sleep(STALL)  # the scenario itself, not a wait for something to happen
        finally:
            os.kill(sup, signal.SIGCONT)
        # the overdue tick runs before this is answered (it needs the processes' snapshots)
        assert worker.ask("STATS")["status"] == 200
        assert "has answered nothing" not in worker.log.read_text()
        assert children_of(sup) == kids
        rcpts = drop_burst(worker, 6)
        wait_for(lambda: all_final(worker, 6), what="every envelope delivered")
        assert delivered(srv) == dict.fromkeys(rcpts, 1)
        assert children_of(sup) == kids


def test_reload_changes_the_watchdog(tmp_path: Path) -> None:
    """RELOAD lowers ``worker.watchdog`` from 30 s to 1 s: a process stopped afterwards is
    killed under the new timeout (long before the old one), and the idle, healthy one beside
    it is left alone."""
    with supervising(tmp_path, {"processes": 2, "watchdog": 30}) as (worker, _, sup, kids):
        data = yaml.safe_load(worker.config.read_text())
        data["worker"]["watchdog"] = 1
        worker.config.write_text(yaml.safe_dump(data))
        assert worker.ask("RELOAD")["status"] == 200
        os.kill(kids[0], signal.SIGSTOP)
        wait_for(lambda: not alive(kids[0]), what="the stopped process killed")
        assert alive(kids[1])
        assert kids[1] in children_of(sup)
    log = worker.log.read_text()
    assert log.count("has answered nothing for") == 1, log
