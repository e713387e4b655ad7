"""The supervisor's delivery processes: each started fresh (``python -m spoolsmtp child``, not
a fork of a threaded process) with one end of a socketpair, watched through a pidfd, and
started again when it dies, with backoff while it keeps dying (one log line per episode).

A child keeps its node name across restarts, so the next one resumes what the last one had in
flight exactly as a restarted worker does. What the supervisor had handed it and not yet heard
back about (``outstanding``) is given back to the supervisor when it dies (``lost``).

A child that holds its node and then answers nothing for ``worker.watchdog`` seconds (stopped,
or its event loop stuck) is killed with SIGKILL and so started again (``watch``, called on every
tick of the supervisor's watchdog; ``verdict`` is its pure decision): what it had been handed
goes back, and its node resumes as after any kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from spoolsmtp.app import sdnotify
from spoolsmtp.app.link import Link

log = logging.getLogger("spoolsmtp")
STEADY = 10.0  # a child up this long has stopped dying: the next death starts a new episode
WATCH_TICK_MAX = 1.0  # the supervisor's watchdog looks at least this often
BACKOFF_MAX = 30.0
CRASH_HOOK = "SPOOLSMTP_CRASH_AT"  # the crash tests' (crashpoint.py): the first start only


class Verdict(Enum):
    """What the watchdog does about one child on one tick."""

    NOTHING = "nothing"
    PING = "ping"  # quiet for a tick: ask it something, so that a live one answers
    KILL = "kill"  # quiet for the whole timeout


def watch_tick(timeout: float) -> float:
    """How often the watchdog looks: a quarter of the timeout, at most ``WATCH_TICK_MAX``."""
    return min(timeout / 4, WATCH_TICK_MAX) if timeout > 0 else WATCH_TICK_MAX


def verdict(quiet: float, timeout: float) -> Verdict:
    """A child that holds its node and has said nothing for ``quiet`` seconds."""
    if timeout <= 0:
        return Verdict.NOTHING
    if quiet >= timeout:
        return Verdict.KILL
    return Verdict.PING if quiet >= watch_tick(timeout) else Verdict.NOTHING


def describe(code: int) -> str:
    """A return code as an operator reads it."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Child:
    """One delivery process slot: its node name, the process now in it, and its link."""

    def __init__(
        self,
        index: int,
        name: str,
        command: Callable[[int, int], list[str]],
        config: Callable[[], str],
        handle: Callable[[Child, dict[str, list[Any]]], None],
        lost: Callable[[Child], None],
    ) -> None:
        self.index = index
        self.name = name
        self._command = command
        self._config = config  # the configuration the whole runs on, as YAML
        self._handle = handle
        self._lost = lost
        self.proc: subprocess.Popen[bytes] | None = None
        self.link: Link | None = None
        self.outstanding: set[str] = set()  # names and ids handed over, not yet reported back
        self.snapshot: dict[str, Any] = {}
        self.counters: dict[str, Any] = {}  # its latest counters, from a snapshot or pushed
        self.silent = False  # it did not answer the last snapshot asked of it
        self.heard = 0.0  # when it last said anything (monotonic)
        self.holding = False  # it said it holds its node: from then on it must answer
        self.killed = False  # the watchdog killed the process now in the slot
        self.starts = 0
        self._failures = 0
        self._started_at = 0.0
        self._stopping = False
        self._episode = False
        self._answers: dict[int, asyncio.Future[Any]] = {}
        self._seq = itertools.count(1)
        self._stop_asked = asyncio.Event()
        self._life: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        """Running and answering for all we know: not once the watchdog has killed it (a
        process stuck in the kernel dies only when its system call returns; meanwhile it is
        handed nothing, asked nothing, and not said to be running again)."""
        return self.link is not None and not self.link.closed.is_set() and not self.killed

    def start(self) -> None:
        self._life = asyncio.create_task(self._keep_running())

    async def _keep_running(self) -> None:
        while not self._stopping:
            await self._run_once()
            if self._stopping:
                break
            delay = self._backoff()
            if delay:  # cut short by stop: a child waiting to be started again is not
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop_asked.wait()

    def _backoff(self) -> float:
        if time.monotonic() - self._started_at >= STEADY:
            self._failures = 0
        self._failures += 1
        return 0.0 if self._failures == 1 else min(0.25 * 2.0 ** (self._failures - 1), BACKOFF_MAX)

    async def _run_once(self) -> None:
        # nothing is awaited before the Popen below: the supervisor yields once after
        # ``start`` so that every process is spawned before it rescans incoming/
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        for name in sdnotify.ENVIRONMENT:  # only the supervisor speaks to systemd
            env.pop(name, None)
        if self.starts:
            env.pop(CRASH_HOOK, None)
        config = -1
        try:
            # the configuration the supervisor runs on, not the file: it may have been
            # edited since (for the next restart) or broken, and one process started again
            # must not run on something else than its siblings
            config = _in_memory(self._config())
            # a group of its own: a ^C at the terminal reaches the supervisor alone, which
            # then drains its children in order (and not restarts them as they exit)
            self.proc = subprocess.Popen(
                self._command(theirs.fileno(), config),
                pass_fds=(theirs.fileno(), config),
                env=env,
                process_group=0,
            )
        except OSError as exc:
            ours.close()
            if not self._episode:
                self._episode = True
                log.error("cannot start delivery process %s: %s; trying again", self.name, exc)
            self._started_at = time.monotonic()
            return
        finally:
            theirs.close()
            if config >= 0:
                os.close(config)
        self.starts += 1
        self._started_at = self.heard = time.monotonic()
        self.holding = self.killed = False
        ours.setblocking(False)
        link = Link(ours, self._received)
        await link.open()
        self.link = link
        self._handle(self, {"up": [self.starts]})
        code = await self._wait(self.proc)
        await link.close()
        self.link = None
        for future in self._answers.values():
            if not future.done():
                future.set_result(None)
        self._answers.clear()
        if not self._stopping and not self.killed:  # the watchdog's kill is logged already
            if self._episode:
                log.debug("delivery process %s %s again", self.name, describe(code))
            else:
                self._episode = True
                log.warning(
                    "delivery process %s (pid %d) %s; starting it again",
                    self.name,
                    self.proc.pid,
                    describe(code),
                )
        self._lost(self)

    async def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        """The process's return code, waited for without a thread: its pidfd becomes
        readable when it exits."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def exited() -> None:
            if not done.done():
                done.set_result(None)

        pidfd = os.pidfd_open(proc.pid)
        try:
            loop.add_reader(pidfd, exited)
            try:
                await done
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        return proc.wait()

    def watch(self, now: float, timeout: float) -> None:
        """One tick of the watchdog (``verdict``): a child that holds its node and has been
        quiet is pinged; one quiet for ``timeout`` is killed, once, with one log line, and its
        slot started again as after any death. Not while it starts (resuming a large node, or
        waiting for a previous process of its node to let go), nor while it drains to stop."""
        if not self.up or not self.holding or self._stopping or self.proc is None:
            return
        quiet = now - self.heard
        action = verdict(quiet, timeout)
        if action is Verdict.PING:
            self.send("o", [0, "ping", []])
        elif action is Verdict.KILL:
            self.killed = True
            self._episode = True  # its exit is not logged again, its steady run is
            log.warning(
                "delivery process %s (pid %d) has answered nothing for %.0f s (stopped, or its "
                "event loop stuck): killed, to be started again; what it had in flight resumes "
                "from its node",
                self.name,
                self.proc.pid,
                quiet,
            )
            self.proc.kill()  # not yet reaped (its pidfd is waited on): the pid is still its

    def forgive(self, late: float, now: float) -> None:
        """The supervisor itself did not run for ``late`` seconds (stopped, starved of CPU):
        what the child said meanwhile is unread, so that time is not held against it."""
        self.heard = min(self.heard + late, now)

    def _received(self, batch: dict[str, list[Any]]) -> None:
        self.heard = time.monotonic()
        if "h" in batch:
            self.holding = True
        for seq, value in batch.get("a", ()):
            future = self._answers.pop(seq, None)
            if future is not None and not future.done():
                future.set_result(value)
        self._handle(self, batch)

    def send(self, kind: str, item: Any) -> None:
        if self.link is not None:
            self.link.send(kind, item)

    async def ask(self, op: str, *args: Any, timeout: float = 10.0) -> Any:
        """One request; its answer, or None if the child is down or does not answer in time."""
        if not self.up:
            return None
        seq = next(self._seq)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._answers[seq] = future
        self.send("o", [seq, op, list(args)])
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            self._answers.pop(seq, None)
            return None

    def steady(self) -> None:
        """Called now and then: a child that has stayed up ends its episode of dying."""
        if self._episode and self.up and time.monotonic() - self._started_at >= STEADY:
            self._episode = False
            log.info("delivery process %s is running again", self.name)

    async def stop(self, timeout: float) -> None:
        """Ask it to finish what is in flight and exit; SIGKILL if it takes longer than
        ``timeout`` (what it had in flight is resumed at the next start)."""
        self._stopping = True
        self._stop_asked.set()
        if self.up:
            self.send("o", [0, "stop", []])
        elif self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        if self._life is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._life)
        except TimeoutError:
            if self.proc is not None and self.proc.poll() is None:
                log.warning("delivery process %s did not stop in time; killing it", self.name)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
            await self._life


def _in_memory(text: str) -> int:
    """A descriptor of a file in memory holding ``text``, read from its start."""
    fd = os.memfd_create("spoolsmtp-config")
    try:
        os.write(fd, text.encode())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def child_command(
    config: str, node: str, children: int, index: int, sched: int | None = None
) -> Callable[[int, int], list[str]]:
    """The command line of a delivery process, given the descriptors of its end of the pair
    and of its configuration (``config`` names the file, for RELOAD and the log); ``sched``
    is the CPU scheduling policy it is to run under (cpusched.py)."""

    def command(fd: int, config_fd: int) -> list[str]:
        policy = [] if sched is None else ["--sched", str(sched)]
        return [
            sys.executable,
            "-m",
            "spoolsmtp",
            "child",
            "--config",
            config,
            "--config-fd",
            str(config_fd),
            "--node",
            node,
            "--fd",
            str(fd),
            "--parent",
            str(os.getpid()),
            "--of",
            f"{index}/{children}",
            *policy,
        ]

    return command
