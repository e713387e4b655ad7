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
    "queueing_report",
    "queued_report",
    "report_committed",
    "before_final_rename",
    "before_checkpoint",
)
# reached only where a node adopts another's work (tests/test_hosts.py), not by one worker
ADOPTION_PHASES = ("adopting",)
# reached only by a supervisor's delivery process (tests/test_supervisor_crash.py): an envelope
# is in deferred/ or hold/, durably, and the supervisor has not yet been told
SUPERVISED_PHASES = ("queued_untold",)


# read once: the worker reaches these points many times per envelope, and the crash tests set
# the variable in the environment of the process they start
_ARMED = os.environ.get("SPOOLSMTP_CRASH_AT")


def reach(phase: str) -> None:
    if phase == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
