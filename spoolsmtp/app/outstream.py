"""What every command owes the terminal and the pipe it prints to: its version from the
installed package's metadata, and a quiet end when the reader of its output goes away.

``spoolsmtp ctl QUERY | head -1``: once ``head`` has its line it closes the pipe, and the next
write raises BrokenPipeError. Coreutils programs are killed by SIGPIPE there, silently, and the
shell reports status 141 (128 + 13); ``quiet_on_broken_pipe`` ends the same way, with no
traceback and no "Exception ignored" from the interpreter's last flush. A broken pipe that is
not standard output's (a control socket the worker closed) is left to the caller.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Callable
from importlib import metadata

DISTRIBUTION = "spoolsmtp"


def version() -> str:
    """The installed distribution's version (``importlib.metadata``), or a note that this
    copy runs from a source tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "(not installed: running from a source tree)"


def stdout_gone() -> bool:
    """True when standard output is a pipe (or socket) whose reader has closed it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events)


def quiet_on_broken_pipe(command: Callable[[], int]) -> int:
    """Run ``command`` and flush its output; if its reader went away, die of SIGPIPE as
    coreutils do (the shell sees 141), without a traceback."""
    try:
        code = command()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        if not stdout_gone():
            raise
    die_of_sigpipe()
    return 141  # not reached


def die_of_sigpipe() -> None:
    """End the process as SIGPIPE's default action does; output that is still buffered goes
    nowhere (standard output now points at /dev/null, so the last flush cannot fail)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
