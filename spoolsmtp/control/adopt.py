"""ADOPT: the operator takes over the work of a dead node of a shared spool (spool/nodes.py).

``ADOPT node`` (``ADOPT -`` for the default node, the spool's own active/ and journal/) adopts
a node whose lock is free, as the worker does by itself at start and every rescan: its
envelopes in flight are resumed here and its retries scheduled here. A node whose lock is held
is alive and is never adopted (409); a name the spool has no area for is a 404.
"""

from __future__ import annotations

from spoolsmtp.control import commands
from spoolsmtp.control.commands import BAD, CONFLICT, NOT_FOUND, OK, Answer
from spoolsmtp.control.port import ControlPort
from spoolsmtp.spool.nodes import NodeAlive, NoSuchNode, shown, valid

DEFAULT = "-"


async def run(port: ControlPort, command: str, args: list[str]) -> Answer:
    if len(args) != 1:
        return Answer(BAD, command, text=["usage: ADOPT node (or - for the default node)"])
    node = "" if args[0] == DEFAULT else args[0]
    if not valid(node):
        return Answer(BAD, command, text=[f"not a node name: {args[0][:64]!r}"])
    try:
        done = await port.adopt(node)
    except NoSuchNode as exc:
        return Answer(NOT_FOUND, command, text=[str(exc)])
    except NodeAlive as exc:
        return Answer(CONFLICT, command, text=[str(exc)])
    data = {"node": node, "envelopes": done.envelopes, "deferred": done.deferred}
    text = (
        f"adopted node {shown(node)}: {done.envelopes} envelope(s) in flight resumed here,"
        f" {done.deferred} retries scheduled"
    )
    return Answer(OK, command, data, [text])


commands.register(
    "ADOPT",
    run,
    [("ADOPT node|-", "authorised", "take over a dead node's work (-: the default node)")],
)
