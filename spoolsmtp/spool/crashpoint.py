"""Named crash points for the crash tests: ``SPOOLSMTP_CRASH_AT=phase`` kills the process with
SIGKILL (exactly what kill -9 does) the first time it reaches that phase. Unset, it is a no-op.
"""

from __future__ import annotations

import os
import signal

PHASES = (
    "after_claim",
    "reading",
    "after_rcpt",
    "mid_data",
    "after_dot",
    "after_250",
    "after_journal",
    "writing_bounce",
    "before_final_rename",
    "before_checkpoint",
)
# reached only where a node adopts another's work (tests/test_hosts.py), not by one worker
ADOPTION_PHASES = ("adopting",)


# read once: the worker reaches these points many times per envelope, and the crash tests set
# the variable in the environment of the process they start
_ARMED = os.environ.get("SPOOLSMTP_CRASH_AT")


def reach(phase: str) -> None:
    if phase == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
