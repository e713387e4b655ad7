"""The mail log: one line per recipient outcome, envelope taken or rejected, report written and
operator action, in the shape Postfix's log has (``ID: to=<...>, relay=..., delay=...,
delays=a/b/c/d, dsn=..., status=... (reply)``), so that the tools that read Postfix's log read
this one.

Each line is first its fields (an ordered ``dict``; the builders below are pure functions of
outcome values), then rendered as text here or as JSON by the log's formatter (app/logsetup.py:
``log_format``), from the same fields. ``emit`` is the one place that logs them: at info, on the
``spoolsmtp`` logger, so every process writes its own lines to its own stderr.

The id of a line about one transaction is ``ID.N`` (envelope id, transaction number: what the
reports call the message), of a line about the whole envelope ``ID``. A recipient's ``delays``
are four numbers of seconds (README, "The mail log"):

- a: from arrival (the claim out of incoming/) to the start of this attempt: the read, the
  waits between attempts, the earlier attempts;
- b: from the start of this attempt to the start of this recipient's transaction (the
  envelope's earlier transactions in this attempt);
- c: connection set-up: waiting for a connection slot, DNS, connect, greeting, EHLO, STARTTLS
  (only the wait on a reused connection);
- d: transmission: MAIL FROM to the reply to the final dot.

``delay`` is from arrival to the outcome. Statuses are Postfix's words: ``sent`` (2xx),
``deferred`` (4xx, or no answer), ``bounced`` (5xx), ``expired`` (failed at ``retry.max_age``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from spoolsmtp.model.reply import Reply, escape_controls

log = logging.getLogger("spoolsmtp")
Fields = dict[str, Any]
EXTRA = "maillog"  # the log record attribute that carries the fields to the formatter

# a recipient's status in the record -> the mail log's word
STATUS = {"delivered": "sent", "failed": "bounced", "deferred": "deferred"}
# a report's kind (the tag's first word after the transaction) -> what the line calls it
REPORT = {
    "ndr": "sender non-delivery notification",
    "delay": "sender delay notification",
    "success": "sender delivery status notification",
    "batch": "sender batch error notification",
}


def dsn_of(reply: Reply) -> str:
    """The enhanced status code of a reply; from its class when the server gave none."""
    return reply.enhanced or f"{reply.code // 100}.0.0"


def relay_of(host: str | None, address: str | None, port: int | None) -> str:
    """``host[address]:port``, or ``none`` when no server said it (spoolsmtp decided)."""
    if host is None:
        return "none"
    return f"{host}[{address or host}]:{port}" if port else f"{host}[{address or host}]"


def _seconds(value: float) -> float:
    return round(max(0.0, value), 2)


def recipient(
    line_id: str,
    to: str,
    status: str,
    reply: Reply,
    relay: str,
    delay: float,
    delays: tuple[float, float, float, float],
) -> Fields:
    """One recipient's outcome of one attempt; ``status``: sent, deferred, bounced, expired."""
    return {
        "event": "recipient",
        "id": line_id,
        "to": to,
        "relay": relay,
        "delay": _seconds(delay),
        "delays": [_seconds(d) for d in delays],
        "dsn": dsn_of(reply),
        "status": status,
        "reply": escape_controls(str(reply)),
    }


def taken(line_id: str, sender: str, size: int, nrcpt: int, file: str, uid: int | None) -> Fields:
    """One transaction of an envelope taken from incoming/ and read."""
    return {
        "event": "take",
        "id": line_id,
        "from": sender,
        "size": size,
        "nrcpt": nrcpt,
        "file": escape_controls(file),
        "uid": uid,
    }


def rejected(envelope_id: str, file: str, reason: str) -> Fields:
    """A file taken that is not an envelope: it went to rejected/."""
    return {"event": "reject", "id": envelope_id, "file": escape_controls(file), "reason": reason}


def refused(envelope_id: str, line: str) -> Fields:
    """A command of an envelope refused when it was read (``source:line: reply``)."""
    return {"event": "refuse", "id": envelope_id, "reason": escape_controls(line)}


def report(envelope_id: str, tag: str, folder: str, name: str) -> Fields:
    """A report about the envelope written (to bounces/, deadletter/ or incoming/)."""
    words = tag.split(".")
    kind = words[1] if words[0].isdigit() and len(words) > 1 else words[0]
    return {
        "event": "report",
        "id": envelope_id,
        "kind": REPORT.get(kind, f"sender {kind} notification"),
        "report": f"{envelope_id}.{tag}",
        "file": f"{folder}/{name}",
    }


def concluded(envelope_id: str, state: str, left: int, next_attempt: str | None) -> Fields:
    """Where an attempt left the envelope: done, deferred (``left`` recipients, next attempt
    at ``next_attempt``) or held."""
    return {
        "event": "conclude",
        "id": envelope_id,
        "state": state,
        "left": left,
        "next_attempt": next_attempt,
    }


def action(command: str, envelope_id: str | None, uid: int, pid: int, said: str) -> Fields:
    """An operator's command that changed something, by whom (the control socket's
    SO_PEERCRED): one line per envelope it acted on, or one for the whole command."""
    return {
        "event": "action",
        "id": envelope_id,
        "command": command,
        "uid": uid,
        "peer_pid": pid,
        "result": escape_controls(said),
    }


def actions(command: str, data: dict[str, Any], uid: int, pid: int, said: str) -> list[Fields]:
    """The lines of one successful operator command: per envelope for HOLD, RELEASE (and any
    command whose answer lists ``envelopes``), else one."""
    verb = command.split(maxsplit=1)[0]
    envelopes = data.get("envelopes")
    if isinstance(envelopes, list) and envelopes and all(isinstance(e, str) for e in envelopes):
        messages = data.get("messages")
        if not (isinstance(messages, list) and len(messages) == len(envelopes)):
            messages = [said] * len(envelopes)
        return [action(verb, e, uid, pid, str(m)) for e, m in zip(envelopes, messages, strict=True)]
    return [action(command, None, uid, pid, said)]


# -- text --------------------------------------------------------------------------------------


def _recipient_text(f: Fields) -> str:
    delays = "/".join(f"{d:.2f}".rstrip("0").rstrip(".") or "0" for d in f["delays"])
    return (
        f"{f['id']}: to=<{f['to']}>, relay={f['relay']}, delay={_num(f['delay'])}, "
        f"delays={delays}, dsn={f['dsn']}, status={f['status']} ({f['reply']})"
    )


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def _take_text(f: Fields) -> str:
    uid = "-" if f["uid"] is None else f["uid"]
    return (
        f"{f['id']}: from=<{f['from']}>, size={f['size']}, nrcpt={f['nrcpt']} "
        f"(file {f['file']}, uid {uid})"
    )


def _conclude_text(f: Fields) -> str:
    if f["state"] == "deferred":
        return (
            f"{f['id']}: deferred, {f['left']} recipient(s) left, next attempt {f['next_attempt']}"
        )
    return f"{f['id']}: {f['state']}"


def _action_text(f: Fields) -> str:
    who = f"by uid {f['uid']} (pid {f['peer_pid']})"
    if f["id"] is not None:
        return f"{f['id']}: {f['command'].lower()} {who}: {f['result']}"
    return f"control: {f['command']} {who}: {f['result']}"


_TEXT: dict[str, Callable[[Fields], str]] = {
    "recipient": _recipient_text,
    "take": _take_text,
    "reject": lambda f: f"{f['file']}: reject: {f['reason']} (id {f['id']})",
    "refuse": lambda f: f"{f['id']}: reject: {f['reason']}",
    "report": lambda f: f"{f['id']}: {f['kind']}: {f['report']} ({f['file']})",
    "conclude": _conclude_text,
    "action": _action_text,
}


def text(fields: Fields) -> str:
    """The line as text, Postfix's shape."""
    return _TEXT[fields["event"]](fields)


def enabled(level: int = logging.INFO) -> bool:
    """Whether a line at ``level`` would be written (else building it is wasted work)."""
    return log.isEnabledFor(level)


def emit(fields: Fields, level: int = logging.INFO) -> None:
    """Log one mail log line, at info unless said (the formatter chooses text or JSON)."""
    if log.isEnabledFor(level):
        log.log(level, "%s", text(fields), extra={EXTRA: fields})


def emit_all(lines: Iterable[Fields]) -> None:
    for fields in lines:
        emit(fields)
