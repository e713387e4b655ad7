"""The spool's folders as states, and the legal moves between them (pure: no I/O).

As in Postfix's queue, a folder is a state and a rename the only transition. ``Spool`` checks
every move of a spool file against ``TRANSITIONS`` (``check``), so a move the life of an
envelope does not have is a programming error raised at once, not a file in the wrong place:

    incoming -> active                       (the claim)
    active   -> active                       (ID.orig becomes ID.bsmtp: legacy conversion;
                                              adoption: a dead node's active/ID into ours)
    active   -> deferred | hold | done       (an attempt concluded)
    active   -> rejected                     (not an envelope, or quarantined)
    deferred -> active                       (a retry: on a shared spool, the claim of a due
                                              retry by whichever node renames it first)
    deferred -> hold, hold -> deferred       (the operator's HOLD and RELEASE)

The other folders (results, bounces, deadletter, journal) only have files written into them.
``active`` and ``journal`` are each node's own (nodes.py): the state is the same whichever
node's area the file is in, so a claim into our active/ and an adoption from a dead node's
active/ into ours are the moves above.
"""

from __future__ import annotations

from enum import StrEnum


class Folder(StrEnum):
    """A spool folder; its value is the folder's name (a ``str``, so paths join as before)."""

    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    DONE = "done"
    RESULTS = "results"
    BOUNCES = "bounces"
    REJECTED = "rejected"
    DEADLETTER = "deadletter"
    JOURNAL = "journal"


TRANSITIONS: frozenset[tuple[Folder, Folder]] = frozenset(
    {
        (Folder.INCOMING, Folder.ACTIVE),
        (Folder.ACTIVE, Folder.ACTIVE),
        (Folder.ACTIVE, Folder.DEFERRED),
        (Folder.ACTIVE, Folder.HOLD),
        (Folder.ACTIVE, Folder.DONE),
        (Folder.ACTIVE, Folder.REJECTED),
        (Folder.DEFERRED, Folder.ACTIVE),
        (Folder.DEFERRED, Folder.HOLD),
        (Folder.HOLD, Folder.DEFERRED),
    }
)


class IllegalMove(RuntimeError):
    """A move between two folders that the life of an envelope does not have: a bug."""

    def __init__(self, source: str, target: str, name: str) -> None:
        super().__init__(f"illegal spool move {source}/{name} -> {target}/ (a bug)")
        self.source, self.target = source, target


def check(source: str, target: str, name: str = "") -> tuple[Folder, Folder]:
    """The move ``source -> target`` as folders; ``IllegalMove`` if it is not one of
    ``TRANSITIONS`` (or either is not a folder)."""
    try:
        move = (Folder(source), Folder(target))
    except ValueError:
        raise IllegalMove(source, target, name) from None
    if move not in TRANSITIONS:
        raise IllegalMove(source, target, name)
    return move
