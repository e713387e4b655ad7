"""What the benchmarks share: the mail they send (size, recipients), and what a process tree
used (CPU, peak RSS, context switches)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from spoolsmtp.bsmtp import writer
from spoolsmtp.model.envelope import Recipient

HEADER = b"Subject: bench\r\n\r\n"
LINE = b"x" * 76 + b"\r\n"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Mail:
    """Envelopes of one sender, ``rcpts`` recipients each, a message of about ``size`` bytes
    (whole 78-byte lines of text after a Subject header; none needs dot-stuffing)."""

    size: int = 2048
    rcpts: int = 1

    @property
    def body(self) -> bytes:
        lines = max(1, (self.size - len(HEADER)) // len(LINE))
        return HEADER + LINE * lines

    def recipients(self, i: int) -> list[str]:
        return [f"r{i}-{k}@example.org" for k in range(self.rcpts)]

    def envelope(self, i: int) -> bytes:
        rcpts = tuple(Recipient(r) for r in self.recipients(i))
        return writer.render([writer.Draft("bench@example.com", rcpts, self.body)], "bench.example")

    def args(self) -> list[str]:
        return [str(self.size), str(self.rcpts)]

    def __str__(self) -> str:
        return f"{len(self.body)} bytes, {self.rcpts} recipient(s) per envelope"


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses


def _family(root: int) -> dict[int, list[str]]:
    """``/proc/PID/stat`` of ``root`` and each live descendant (by the parent each names,
    whichever of its threads started it)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: dict[int, list[str]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid]
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every live descendant, each with the children it reaped
    (utime + stime + cutime + cstime from /proc)."""
    family = _family(root).values()
    return sum(sum(int(x) for x in fields[11:15]) for fields in family) / TICK


def tree_peak_rss(root: int) -> float:
    """The largest peak resident set (VmHWM, MB) among ``root`` and its live descendants.

    Not wait4's ``ru_maxrss``: a process started by a larger one (the benchmark, holding its
    rendered envelopes) carries its parent's peak over the exec, so that figure read the
    benchmark's own size whenever it was the larger. VmHWM belongs to the process's memory
    since its exec."""
    peak = 0
    for pid in _family(root):
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def tree_switches(root: int) -> int:
    """Context switches (voluntary and not) of every thread of ``root`` and its live
    descendants so far, from /proc/PID/task/TID/status: a hand-over of the interpreter lock
    between threads is one or two of them."""
    total = 0
    for pid in _family(root):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as fh:
                    for line in fh:
                        if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                            total += int(line.split()[1])
            except OSError:
                continue
    return total


def own_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` alone, its threads included, not its children (utime + stime)."""
    fields = _stat(pid)
    return 0.0 if fields is None else sum(int(x) for x in fields[11:13]) / TICK


def create_cost(folder: str, count: int = 500) -> float:
    """Microseconds of CPU (kernel time, mostly) to create, write and rename one small file in
    ``folder``, as the worker does for each result record: the state of the file system the
    figures that follow were measured on. On ext4 without a journal it swings by tens of times
    with the inodes freed in the last minutes (each is looked at and skipped); the files are
    left in place, for the caller's clean-up, so as not to add to those."""
    os.makedirs(folder, exist_ok=True)
    started = time.process_time()
    for i in range(count):
        tmp = os.path.join(folder, f".c{i}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"x" * 600)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(folder, f"c{i}.json"))
    return (time.process_time() - started) / count * 1e6


def free_port() -> int:
    """A loopback TCP port free right now (for a server that cannot say which it took)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
