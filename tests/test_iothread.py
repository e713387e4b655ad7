"""The I/O thread of the group commit (spool/iothread.py): results and errors come back to the
awaiting task, calls run one after another off the loop, an idle thread ends and the next call
starts another, and neither a cancelled waiter nor a closed loop stops it serving."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from spoolsmtp.spool import iothread
from spoolsmtp.spool.iothread import IoThread
from tests.hostile import PLAIN_PYTHON, needs_root, reachable_by_others, run_as_nobody
from tests.workerproc import wait_for


def test_results_and_errors_come_back_from_another_thread() -> None:
    thread = IoThread("test-io")

    async def main() -> tuple[int, int, str]:
        ident = await thread.call(threading.get_ident)
        value = await thread.call(lambda: 6 * 7)
        with pytest.raises(OSError, match="no space") as caught:
            await thread.call(lambda: (_ for _ in ()).throw(OSError(28, "no space")))
        return ident, value, str(caught.value)

    ident, value, error = asyncio.run(main())
    assert ident != threading.get_ident()
    assert value == 42
    assert "no space" in error


def test_calls_run_in_the_order_they_were_made() -> None:
    thread = IoThread("test-io")
    seen: list[int] = []

    def note(k: int) -> Callable[[], None]:
        return lambda: seen.append(k)

    async def main() -> None:
        await asyncio.gather(*(thread.call(note(k)) for k in range(50)))

    asyncio.run(main())
    assert seen == list(range(50))


def test_an_idle_thread_ends_and_the_next_call_starts_another() -> None:
    thread = IoThread("test-io", idle=0.05)

    async def once() -> int:
        return await thread.call(lambda: 1)

    assert asyncio.run(once()) == 1
    wait_for(lambda: not thread.running, timeout=10, what="the idle thread to end")
    assert asyncio.run(once()) == 1
    assert thread.started == 2


def test_a_cancelled_waiter_does_not_stop_the_thread() -> None:
    thread = IoThread("test-io")
    gate = threading.Event()
    ran: list[str] = []

    def slow() -> None:
        gate.wait(10)
        ran.append("first")

    problems: list[dict[str, object]] = []

    async def main() -> str:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: problems.append(ctx))
        first = asyncio.ensure_future(thread.call(slow))
        await asyncio.sleep(0)
        first.cancel()
        gate.set()
        return await asyncio.wait_for(thread.call(lambda: "second"), 10)

    assert asyncio.run(main()) == "second"
    assert ran == ["first"]  # it ran (as with to_thread); only its result was dropped
    assert problems == []  # and dropping it raised nothing in the loop


def test_a_loop_closed_before_the_result_is_no_error_in_the_thread() -> None:
    thread = IoThread("test-io")
    gate = threading.Event()
    errors: list[BaseException | None] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:

        async def leave_one_running() -> None:
            thread.call(lambda: gate.wait(10))

        asyncio.run(leave_one_running())  # its loop is closed with the call in flight
        gate.set()

        async def next_call() -> str:
            return await asyncio.wait_for(thread.call(lambda: "served"), 10)

        assert asyncio.run(next_call()) == "served"
    finally:
        threading.excepthook = hook
    assert errors == []


_NO_THREADS = """
import asyncio, resource, sys
sys.path.insert(0, sys.argv[1])
from iothread import IoThread

soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
thread = IoThread("test-io")


async def main() -> None:
    resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))  # this process is one already
    try:
        thread.call(lambda: 1)
    except RuntimeError as exc:
        print("first:", exc)
    resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))
    print("second:", await asyncio.wait_for(thread.call(lambda: 2), 10))


asyncio.run(main())
"""


@needs_root
def test_a_thread_that_cannot_start_fails_that_call_and_the_next_one_starts(
    tmp_path: Path,
) -> None:
    """No more tasks allowed (RLIMIT_NPROC of an unprivileged user, as a systemd TasksMax
    would): the call that needed a thread fails, with nothing left queued, and once threads
    can be started again the next call gets one (it used to queue behind a thread that never
    ran, and the group commit waited for ever)."""
    shutil.copy(iothread.__file__, tmp_path / "iothread.py")
    reachable_by_others(tmp_path)
    tmp_path.chmod(0o755)  # the import system lists the folder
    done = run_as_nobody(
        [PLAIN_PYTHON, "-c", _NO_THREADS, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "first: can't start new thread" in done.stdout
    assert "second: 2" in done.stdout
