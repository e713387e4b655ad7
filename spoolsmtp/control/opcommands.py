"""The operator commands the VM service machine and the queue tools have beyond the basic set:
HOLD/RELEASE by destination and for all, DELETE, BOUNCE, REBOOT, and a bare TRACE that turns
tracing on as VM's did. Registered into ``commands`` (``commands.register``) when this module is
imported (the control server imports it); every one needs root or an authorised user or group.

- ``HOLD ID|ALL|*|DEST domain`` / ``RELEASE ...``: ALL (or ``*``) is every queued envelope,
  DEST every envelope with a recipient at that destination (the whole envelope is held). An
  envelope being delivered is held once its attempt ends.
- ``DELETE ID [REPORT]``: drop the envelope, like ``postsuper -d``: every recipient not yet
  final fails ("deleted by the operator"), the sender is told only with REPORT, the envelope
  file is removed and its result record stays in results/, final, saying who deleted it.
- ``BOUNCE ID``: return it to its sender now: every recipient not yet final fails, with a
  non-delivery report per NOTIFY, and the envelope goes to done/ as after any last attempt.
- ``REBOOT``: finish what is in flight, release the spool, and re-execute the same command
  line (new code, new configuration), as VM's SMSG REBOOT.
- ``TRACE`` alone: trace the SMTP dialogues (``TRACE SESSION``), as VM's TRACE did;
  ``TRACE STATUS`` says what is traced and changes nothing.

An envelope being delivered at the moment cannot be deleted or bounced: 409, try again.
The operator's uid, for the log lines of DELETE, BOUNCE and REBOOT, is set by the server per
request in ``OPERATOR``.
"""

from __future__ import annotations

from contextvars import ContextVar

from spoolsmtp.control import commands
from spoolsmtp.control.commands import (
    CONFLICT,
    OK,
    Answer,
    _bad,
    _bad_domain,
    _bad_id,
    _queued,
    _trace,
)
from spoolsmtp.control.port import Busy, ControlPort
from spoolsmtp.control.tracer import Kind
from spoolsmtp.model.record import State

OPERATOR: ContextVar[int] = ContextVar("operator_uid", default=-1)


async def _each(port: ControlPort, command: str, args: list[str], action: str) -> Answer:
    usage = f"usage: {action} ID|ALL|DEST domain"
    hold = action == "HOLD"
    # HOLD takes queued and active envelopes (an active one is held after its attempt)
    wanted = (State.DEFERRED, State.ACTIVE) if hold else (State.HELD,)
    if len(args) == 2 and args[0].upper() == "DEST":
        bad = _bad_domain(command, args[1])
        if bad:
            return bad
        key = port.destination_key(args[1])
        ids = [
            s.id for s in list(port.index.values()) if s.state in wanted and key in s.destinations
        ]
    elif len(args) == 1 and args[0].upper() in ("ALL", "*"):
        ids = [s.id for s in list(port.index.values()) if s.state in wanted]
    elif len(args) == 1:
        bad = _bad_id(command, args[0])
        if bad:
            return bad
        ids = [_queued(port, args[0])]
    else:
        return _bad(command, usage)
    run = port.hold if hold else port.release
    done: list[str] = []
    said: list[str] = []
    for envelope_id in ids:
        # one that left the queue while an earlier one was moved is skipped
        if envelope_id in port.index:
            said.append(await run(envelope_id))
            done.append(envelope_id)
    text = said or [f"nothing to {action.lower()}"]
    return Answer(OK, command, {"envelopes": done, "messages": said}, text)


async def _hold(port: ControlPort, command: str, args: list[str]) -> Answer:
    return await _each(port, command, args, "HOLD")


async def _release(port: ControlPort, command: str, args: list[str]) -> Answer:
    return await _each(port, command, args, "RELEASE")


def _one(command: str, args: list[str], port: ControlPort) -> Answer | str:
    bad = _bad_id(command, args[0])
    return bad if bad else _queued(port, args[0])


async def _delete(port: ControlPort, command: str, args: list[str]) -> Answer:
    flag = args[1].upper() if len(args) == 2 else None
    if not args or len(args) > 2 or flag not in (None, "REPORT", "NOREPORT"):
        return _bad(command, "usage: DELETE ID [REPORT]")
    envelope_id = _one(command, args, port)
    if isinstance(envelope_id, Answer):
        return envelope_id
    report = flag == "REPORT"
    try:
        said = await port.delete(envelope_id, OPERATOR.get(), report=report)
    except Busy as exc:
        return Answer(CONFLICT, command, text=[str(exc)])
    data = {"envelope": envelope_id, "deleted": True, "report": report, "message": said}
    return Answer(OK, command, data, [said])


async def _bounce(port: ControlPort, command: str, args: list[str]) -> Answer:
    if len(args) != 1:
        return _bad(command, "usage: BOUNCE ID")
    envelope_id = _one(command, args, port)
    if isinstance(envelope_id, Answer):
        return envelope_id
    try:
        said = await port.bounce(envelope_id, OPERATOR.get())
    except Busy as exc:
        return Answer(CONFLICT, command, text=[str(exc)])
    return Answer(OK, command, {"envelope": envelope_id, "bounced": True, "message": said}, [said])


async def _reboot(port: ControlPort, command: str, args: list[str]) -> Answer:
    if args:
        return _bad(command, "REBOOT takes no argument")
    port.reboot(OPERATOR.get())
    text = "rebooting: finishing work in flight, then starting again with the new code and config"
    return Answer(OK, command, {"rebooting": True}, [text])


async def _trace_vm(port: ControlPort, command: str, args: list[str]) -> Answer:
    # TRACE STATUS: commands' TRACE without an argument, which says what is traced
    status = len(args) == 1 and args[0].upper() == "STATUS"
    return await _trace(port, command, [] if status else args or [Kind.SESSION.name])


commands.register(
    "HOLD",
    _hold,
    [("HOLD ID|ALL|DEST domain", "authorised", "keep envelopes from being retried (or '*')")],
)
commands.register(
    "RELEASE", _release, [("RELEASE ID|ALL|DEST domain", "authorised", "undo HOLD; retry at once")]
)
commands.register(
    "TRACE",
    _trace_vm,
    [
        ("TRACE [RESOLVER|SESSION|SPOOL|ALL]", "authorised", "trace to the log; alone: SESSION"),
        ("TRACE STATUS", "authorised", "what is traced"),
    ],
)
commands.register(
    "DELETE",
    _delete,
    [("DELETE ID [REPORT]", "authorised", "drop an envelope (REPORT: tell the sender)")],
)
commands.register(
    "BOUNCE", _bounce, [("BOUNCE ID", "authorised", "return to the sender now, with a report")]
)
commands.register(
    "REBOOT", _reboot, [("REBOOT", "authorised", "drain, then restart with new code and config")]
)
commands.HELP.append(("QUIT | EXIT", "anyone", "end this session (the worker says goodbye)"))
