"""The supervisor's CPU scheduling policy: SCHED_BATCH for itself, the policy it was started
with for its delivery processes.

The supervisor wakes for every batch its processes send (about once per envelope in a burst)
and for every name the watcher sees. Under Linux's default policy each of those wake-ups may
preempt a delivery process in the middle of its work, a switch of context and of cache for
work that can wait: each process has twice its share of envelopes in hand. SCHED_BATCH keeps
the supervisor's share of the CPU and its nice value, but its wake-ups no longer preempt a
running thread; they wait for the next tick or a free core (README, Benchmarks). Any process
may choose it for itself, and go back, without privilege.

The delivery processes inherit the supervisor's policy; each puts itself back under the one
the supervisor was started with (``--sched``), so what systemd's ``CPUSchedulingPolicy=`` or
``chrt`` set for the service is what delivers. Only SCHED_OTHER and SCHED_BATCH are switched
between: a supervisor started under another policy (idle, a real-time one, or any with
reset-on-fork set) keeps it, as does one whose system calls to read or set it are refused
with an error.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("spoolsmtp")

_OTHER: int | None = getattr(os, "SCHED_OTHER", None)
_BATCH: int | None = getattr(os, "SCHED_BATCH", None)


def current() -> int | None:
    """This process's policy, or None where the platform has none to set (not Linux)."""
    if _BATCH is None or not hasattr(os, "sched_getscheduler"):
        return None
    try:
        return os.sched_getscheduler(0)
    except OSError:  # refused (a seccomp filter, say): the policy is left as it is
        return None


def supervise() -> int | None:
    """The supervisor's: put every thread of this process under SCHED_BATCH (threads started
    later inherit it); the policy it had, for its delivery processes to return to, and for
    ``back_to`` when it stops (so that REBOOT, which re-executes it, starts it under the
    policy it was first started with)."""
    started = current()
    if started is not None and started == _OTHER:
        _set_all(_BATCH)
    return started


def back_to(policy: int | None) -> None:
    """Every thread of this process back under ``policy`` (what ``supervise`` returned, or
    a delivery process's ``--sched``), if it had been moved from it to SCHED_BATCH."""
    now = current()
    if policy is not None and now is not None and now == _BATCH and policy == _OTHER:
        _set_all(policy)


def _set_all(policy: int | None) -> None:
    if policy is None:
        return
    for tid in _threads():
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:
            continue  # a thread that ended meanwhile
        except OSError as exc:  # a seccomp filter, say: the policy it has is kept
            log.info("scheduling policy left as it was: %s", exc.strerror)
            return


def _threads() -> list[int]:
    """This process's threads (Linux's /proc), or the calling one."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
