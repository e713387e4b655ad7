"""``spoolsmtp-sendmail``: a sendmail-compatible entry point over ``submit``.

It accepts what cron, logwatch, ERP systems and PHP's mail() pass to /usr/sbin/sendmail:
``-t -i -oi -f ADDR -F NAME -bm -odi -oem`` and friends. Flags that do not change what is sent
(delivery mode, error mode, verbosity, queue options) are ignored with a debug note; modes that
are not "send a message" (-bs, -bp, -bd, -q ...) are refused. Recipients are the arguments.
The config is ``$SPOOLSMTP_CONFIG``, else ``conf/spoolsmtp.yaml``, else
``/etc/spoolsmtp/spoolsmtp.yaml``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from spoolsmtp import config as configmod
from spoolsmtp import exitcodes
from spoolsmtp.envelope import Notify, Ret
from spoolsmtp.errors import ConfigError
from spoolsmtp.submit import Submission, submit

log = logging.getLogger("spoolsmtp.sendmail")
_WITH_VALUE = {"f", "F", "r", "N", "R", "V", "B", "L", "O", "X", "C", "h", "p", "q"}
_REFUSED_MODES = {"s", "p", "d", "D", "i", "t", "v", "h", "H", "P", "a"}


class UsageError(Exception):
    pass


def parse(argv: Sequence[str]) -> tuple[Submission, list[str]]:
    """sendmail's command line: (what to send, ignored flags)."""
    sender: str | None = None
    full_name: str | None = None
    from_headers = False
    dot_ends = True
    notify: frozenset[Notify] | None = None
    ret: Ret | None = None
    envid: str | None = None
    verbose = False
    ignored: list[str] = []
    recipients: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            recipients += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            recipients.append(arg)
            continue
        flag, rest = arg[1], arg[2:]
        if flag in _WITH_VALUE and not rest and flag not in ("O",):
            if i >= len(args):
                raise UsageError(f"option -{flag} needs a value")
            rest = args[i]
            i += 1
        if flag in ("f", "r"):
            sender = rest.strip("<>")
        elif flag == "F":
            full_name = rest
        elif flag == "t":
            from_headers = True
        elif flag == "i" or (flag == "o" and rest == "i"):
            dot_ends = False
        elif flag == "b":
            if rest and rest[0] in _REFUSED_MODES:
                raise UsageError(f"mode -b{rest} is not supported: this sendmail only queues mail")
            if rest not in ("m", ""):
                ignored.append(arg)
        elif flag == "q":
            raise UsageError("-q (run the queue) is not supported; the worker runs it")
        elif flag == "N":
            words = {w.strip().upper() for w in rest.split(",")}
            notify = frozenset() if words == {"NEVER"} else frozenset(Notify(w) for w in words)
        elif flag == "R":
            ret = Ret(rest.upper())
        elif flag == "V":
            envid = rest
        elif flag == "v":
            verbose = True
        else:
            ignored.append(arg)
    sub = Submission(
        sender=sender,
        recipients=tuple(recipients),
        from_headers=from_headers,
        dot_ends=dot_ends,
        full_name=full_name,
        verbose=verbose,
        notify=notify,
        ret=ret,
        envid=envid,
    )
    return sub, ignored


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="spoolsmtp-sendmail: %(message)s")
    try:
        sub, ignored = parse(sys.argv[1:] if argv is None else argv)
    except (UsageError, ValueError) as exc:
        print(f"spoolsmtp-sendmail: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    for flag in ignored:
        log.debug("ignoring %s (it does not change what is queued)", flag)
    try:
        cfg = configmod.load(None)
    except ConfigError as exc:
        print(f"spoolsmtp-sendmail: config error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    return submit(cfg, sub, sys.stdin.buffer, wait_seconds=None, as_json=False, quiet=True)
