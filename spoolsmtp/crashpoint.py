"""Named crash points for the crash tests: ``SPOOLSMTP_CRASH_AT=phase`` kills the process with
SIGKILL (exactly what kill -9 does) the first time it reaches that phase. Unset, it is a no-op.
"""

from __future__ import annotations

import os
import signal

PHASES = (
    "after_claim",
    "after_rcpt",
    "mid_data",
    "after_dot",
    "after_250",
    "after_journal",
    "writing_bounce",
    "before_final_rename",
    "before_checkpoint",
)


def reach(phase: str) -> None:
    if os.environ.get("SPOOLSMTP_CRASH_AT") == phase:
        os.kill(os.getpid(), signal.SIGKILL)
