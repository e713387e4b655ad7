"""``spoolsmtp-sendmail``: a sendmail-compatible entry point over ``submit``.

It accepts what cron, logwatch, ERP systems and PHP's mail() pass to /usr/sbin/sendmail. The
command line is parsed as sendmail's getopt does (GNU getopt, as sendmail on Linux): flags
cluster (``-ti`` is ``-t -i``), a flag that takes a value takes the rest of its cluster or the
next argument (``-oi``, ``-O opt=val``, ``-fuser``, ``-f user``), options may follow recipients,
and ``--`` ends them. Flags that do not change what is sent (delivery and error modes, queue and
logging options) are ignored; modes that are not "send a message" (-bs, -bp, -q ...) and unknown
flags are refused with 64. Every value that reaches the envelope or the message is checked
first: a value that could inject a command or a header is refused with 64, naming the flag.

The config is ``$SPOOLSMTP_CONFIG`` (not for set-id callers), else
``/etc/spoolsmtp/spoolsmtp.yaml``; never one in the current folder (see ``configpath``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from spoolsmtp.app import configpath
from spoolsmtp.app.submit import Submission, submit
from spoolsmtp.model import exitcodes
from spoolsmtp.model.envelope import Notify, Ret
from spoolsmtp.model.errors import ConfigError

log = logging.getLogger("spoolsmtp.app.sendmail")
PROG = "spoolsmtp-sendmail"
# sendmail 8's getopt string, with Postfix's extra flags (-U -x without values)
_WITH_VALUE = frozenset("ABbCDdeFfhLMNOopQqRrVX")
_FLAGS = frozenset("cGIimnsTtvUx")
_IGNORE_DOTS = {"ignoredots", "ignoredots=true", "ignoredots=t", "ignoredots=yes", "ignoredots=y"}
_XTEXT_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "="}


class UsageError(Exception):
    pass


@dataclass
class _Parsed:
    sender: str | None = None
    full_name: str | None = None
    from_headers: bool = False
    dot_ends: bool = True
    notify: frozenset[Notify] | None = None
    ret: Ret | None = None
    envid: str | None = None
    verbose: bool = False
    ignored: list[str] = field(default_factory=list)


def getopt(argv: Sequence[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(flag, value) pairs and the other arguments, as GNU getopt with sendmail's flags."""
    opts: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            operands += argv[i:]
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            flag = arg[j]
            j += 1
            if flag in _WITH_VALUE:
                if j < len(arg):
                    value = arg[j:]
                elif flag == "q":
                    value = ""  # -q alone runs the queue; refused either way
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    raise UsageError(f"-{flag}: option needs a value")
                opts.append((flag, value))
                break
            if flag not in _FLAGS:
                raise UsageError(f"-{flag}: unknown option")
            opts.append((flag, None))
    return opts, operands


def _no_controls(flag: str, value: str) -> None:
    """No C0 or C1 control character, nor DEL, in any value (addresses are checked further,
    for format characters too, when the envelope is built)."""
    for ch in value:
        if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            raise UsageError(f"-{flag}: the value holds a control character (U+{ord(ch):04X})")


def _sender(flag: str, value: str) -> str:
    text = value.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if any(ch in text for ch in "<> \t"):
        raise UsageError(f"-{flag}: {value!r} is not an address")
    return text


def _notify(value: str) -> frozenset[Notify]:
    words = [w.strip().upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return frozenset()
    try:
        return frozenset(Notify(w) for w in words)
    except ValueError:
        raise UsageError(
            f"-N: {value!r}: expected NEVER, or some of SUCCESS,FAILURE,DELAY"
        ) from None


def _envid(value: str) -> str:
    if not value or not all(0x21 <= ord(ch) <= 0x7E for ch in value):
        raise UsageError("-V: the envelope id must be printable ASCII without spaces")
    encoded = "".join(ch if ch in _XTEXT_SAFE else f"+{ord(ch):02X}" for ch in value)
    if len(encoded) > 100:
        raise UsageError("-V: the envelope id is longer than 100 characters (as xtext)")
    return encoded


def _apply(p: _Parsed, flag: str, value: str | None) -> None:
    if value is None:
        if flag == "I":
            raise UsageError("-I: initialising the alias database is not supported")
        if flag == "t":
            p.from_headers = True
        elif flag == "i":
            p.dot_ends = False
        elif flag == "v":
            p.verbose = True
        else:
            p.ignored.append(f"-{flag}")
        return
    _no_controls(flag, value)
    if flag in ("f", "r"):
        p.sender = _sender(flag, value)
    elif flag == "F":
        p.full_name = value  # checked as a phrase when the From field is built
    elif (flag == "o" and value == "i") or (flag == "O" and value.strip().lower() in _IGNORE_DOTS):
        p.dot_ends = False
    elif flag == "b":
        if value != "m":
            raise UsageError(f"-b{value}: mode not supported: this sendmail only queues mail")
    elif flag == "q":
        raise UsageError("-q: running the queue is not supported; the worker runs it")
    elif flag == "N":
        p.notify = _notify(value)
    elif flag == "R":
        if value.strip().upper() not in ("FULL", "HDRS"):
            raise UsageError(f"-R: {value!r}: expected full or hdrs")
        p.ret = Ret(value.strip().upper())
    elif flag == "V":
        p.envid = _envid(value)
    elif flag == "B" and value.upper() not in ("7BIT", "8BITMIME"):
        raise UsageError(f"-B: {value!r}: expected 7BIT or 8BITMIME")
    else:
        p.ignored.append(f"-{flag}{value}")


def parse(argv: Sequence[str]) -> tuple[Submission, list[str]]:
    """sendmail's command line: (what to send, ignored flags)."""
    opts, recipients = getopt(argv)
    p = _Parsed()
    for flag, value in opts:
        _apply(p, flag, value)
    sub = Submission(
        sender=p.sender,
        recipients=tuple(recipients),
        from_headers=p.from_headers,
        dot_ends=p.dot_ends,
        full_name=p.full_name,
        verbose=p.verbose,
        notify=p.notify,
        ret=p.ret,
        envid=p.envid,
    )
    return sub, p.ignored


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        sub, ignored = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    for flag in ignored:
        log.debug("ignoring %s (it does not change what is queued)", flag)
    try:
        cfg = configpath.load_for_callers(None)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    return submit(cfg, sub, sys.stdin.buffer, wait_seconds=None, quiet=True, prog=PROG)
