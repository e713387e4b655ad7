"""The batch reader's fixed answers, and how its response echoes a command line.

Pure text: the replies that depend on nothing the reader holds (NOOP, TICK, HELP, commands not
offered in a batch, unknown verbs), the HELO/EHLO greeting, and the replies to a command line
that is too long or whose line ending differs from the file's.
"""

from __future__ import annotations

import re
from functools import lru_cache

from spoolsmtp.model.reply import Reply, make

_TICK = re.compile(r"^[\x21-\x7e]{1,64}$")
_NOT_IN_BATCH = {"STARTTLS", "AUTH", "VRFY", "EXPN", "ETRN", "TURN", "ATRN", "BDAT"}
_ESCAPED = re.compile("[\x00-\x08\x0a-\x1f]")

# Fixed replies built once: the reader answers these without building a Reply per command.
SEND_DATA = make(354, None, "end data with <CR><LF>.<CR><LF>")
BARE_CR = make(500, "5.5.2", "bare CR in command line")
NOT_UTF8 = make(500, "5.5.2", "command line is not valid UTF-8")
RESET = make(250, "2.0.0", "reset")
_NOOP = make(250, "2.0.0", "OK")
_HELP = make(214, "2.0.0", "commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VERB TICK HELP")


def stateless(verb: str, arg: str) -> Reply:
    """The answer to a command that changes nothing in the reader: NOOP, TICK, HELP, a command
    not available in a batch, or an unknown verb."""
    if verb == "NOOP":
        return _NOOP
    if verb == "TICK":
        if not _TICK.match(arg):
            return make(501, "5.5.4", "TICK needs an id of 1 to 64 printable characters")
        return make(250, "2.0.0", f"TICK {arg}")
    if verb == "HELP":
        return _HELP
    if verb in _NOT_IN_BATCH:
        return make(502, "5.5.1", f"{verb} is not available in a batch envelope")
    return make(500, "5.5.2", f"command unrecognized: {echo(verb.encode(), 40)}")


# The replies below depend on a few values that recur from file to file (the job's own name,
# our hostname, the sender): each is built once and shared, a lookup instead of a Reply built
# per file. Replies are immutable values, so sharing them changes nothing but the cost.


@lru_cache(maxsize=64)
def greeting(verb: str, arg: str, hostname: str, max_message_bytes: int) -> Reply:
    """The 250 to an accepted HELO (one line) or EHLO (with the extensions we offer)."""
    if verb == "HELO":
        return Reply(250, None, (f"{hostname} hello {arg}",))
    return Reply(
        250,
        None,
        (
            f"{hostname} hello {arg}",
            f"SIZE {max_message_bytes}",
            "8BITMIME",
            "SMTPUTF8",
            "DSN",
            "ENHANCEDSTATUSCODES",
        ),
    )


@lru_cache(maxsize=256)
def sender_ok(sender: str) -> Reply:
    """The 250 to an accepted MAIL FROM (``sender`` "" for ``<>``)."""
    return make(250, "2.1.0", f"<{sender}> sender ok")


@lru_cache(maxsize=16)
def closing(hostname: str) -> Reply:
    """The 221 to QUIT."""
    return make(221, "2.0.0", f"{hostname} closing")


def too_long(limit: int) -> Reply:
    return make(500, "5.5.2", f"command line longer than {limit} octets")


def mixed(crlf: bool | None) -> Reply:
    expected = "CRLF" if crlf else "LF"
    return make(500, "5.5.2", f"line ending differs from the file's ({expected}): bare LF or CR")


def abandoned(begun: int) -> Reply:
    """The 503 to QUIT or end of file inside a transaction (MAIL at line ``begun``)."""
    return make(503, "5.5.1", f"transaction begun at line {begun} abandoned without DATA")


def echo(content: bytes, limit: int, text: str | None = None) -> str:
    """A command as the batch response echoes it: control characters but tab as ``\\xNN``.

    ``text``: ``content`` decoded as UTF-8, when the caller has done so; within ``limit`` it is
    the text the echo is made of, without decoding again."""
    if text is None or len(content) > limit:
        text = content[:limit].decode("utf-8", "backslashreplace")
    if text.isprintable():  # no control character at all, so none to escape: the usual case
        return text
    return _ESCAPED.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
