"""Telling systemd how the service is doing (``Type=notify``): the sd_notify protocol in a few
lines, with no library.

systemd names a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract name written
with a leading ``@``); each message is newline-separated ``KEY=VALUE`` lines. The worker says
``READY=1`` once its spool is open and its control socket answers, ``RELOADING=1`` and
``READY=1`` around a RELOAD, ``STOPPING=1`` when it starts to drain, and ``WATCHDOG=1`` from
its event loop every half ``$WATCHDOG_USEC``, so a loop that is stuck stops the pings and
systemd kills and restarts it (``WatchdogSec=``).

Everything goes through ``notify``: a supervisor of several workers calls it too, and its
children must not (it removes ``NOTIFY_SOCKET`` from their environment; systemd's default
``NotifyAccess=main`` would drop their messages anyway). Without ``$NOTIFY_SOCKET`` every call
is a no-op; a socket that cannot be reached is logged once, never raised: the mail matters
more than systemd's view of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator

log = logging.getLogger("spoolsmtp")
ENV = "NOTIFY_SOCKET"
# what a process that must not speak to systemd (a delivery process) is started without
ENVIRONMENT = (ENV, "WATCHDOG_USEC", "WATCHDOG_PID")
_warned: set[str] = set()


def _address(value: str) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names (abstract names start with NUL), or None
    for what this module does not speak (vsock addresses, garbage)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ...) in one datagram to ``$NOTIFY_SOCKET``; True if it
    was sent, False when there is no socket or it could not be reached (logged once)."""
    value = os.environ.get(ENV, "")
    if not value:
        return False
    address = _address(value)
    message = "\n".join(states).encode()
    try:
        if address is None:
            raise OSError(f"not a Unix socket address: {value!r}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        if value not in _warned:
            _warned.add(value)
            log.warning("cannot tell systemd at $%s=%s: %s", ENV, value, exc)
        return False
    return True


def ready() -> bool:
    return notify("READY=1", f"STATUS=processing the spool (pid {os.getpid()})")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=draining: finishing what is in flight")


def reloading() -> bool:
    """Before reading the configuration again (``READY=1`` follows when done, good or bad)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


@contextlib.contextmanager
def reloading_now() -> Iterator[None]:
    """Around a RELOAD: ``RELOADING=1``, then ``READY=1`` again once done, applied or refused."""
    reloading()
    try:
        yield
    finally:
        ready()


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half ``$WATCHDOG_USEC``), or None when systemd asked
    for none, or asked another process (``$WATCHDOG_PID``)."""
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 and os.environ.get(ENV) else None


async def watchdog() -> None:
    """Ping systemd's watchdog from the event loop for as long as the loop runs it."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
