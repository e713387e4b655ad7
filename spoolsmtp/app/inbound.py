"""What comes in: who submitted each envelope file (its owner, checked against the submit
policy), and, before it is read as an envelope, a NETDATA file (TSO TRANSMIT, CMS SENDFILE
or NOTE) in active/ is unwrapped into the Batch SMTP envelope it carries, once, right after the
claim; the envelope file is replaced by the result (durably), so a retry or a restart reads the
unwrapped envelope and never unwraps twice (Batch SMTP text never looks like NETDATA).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from spoolsmtp.bsmtp import netdata
from spoolsmtp.bsmtp.unwrap import unwrap
from spoolsmtp.model.envelope import Envelope
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.policy import restrict
from spoolsmtp.policy.restrict import Submitter
from spoolsmtp.spool.folders import SUFFIX

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost


async def unwrapped(
    w: WorkerHost, envelope_id: str, source: str, opened: bytes | BinaryIO
) -> bytes | BinaryIO:
    """``opened`` as it was, or, for a NETDATA file, the envelope it carries (as bytes, with
    the file in active/ replaced by it). Raises ``EnvelopeFault`` for a bad NETDATA file."""
    if isinstance(opened, bytes):
        head = opened[:8]
    else:
        head = opened.read(8)
        opened.seek(0)
    if not netdata.recognised(head):
        return opened
    if isinstance(opened, bytes):
        data = opened
    else:
        with opened:
            data = await asyncio.to_thread(opened.read)
    cfg = w.cfg
    converted = await asyncio.to_thread(
        unwrap,
        data,
        source,
        codepage=cfg.netdata.codepage,
        nodes=cfg.netdata.nodes,
        hostname=cfg.helo_name,
        envelope_id=envelope_id,
    )
    await w.spool.write("active", f"{envelope_id}{SUFFIX}", converted, private=True)
    w._spool_trace(f"{source}: NETDATA unwrapped ({len(data)} -> {len(converted)} octets)")
    return converted


# -- who sent it (policy/restrict.py decides) ---------------------------------------------------


def claim_owner(path: Path) -> dict[str, int]:
    """``uid``/``gid`` of ``incoming/NAME`` for its claim record ({} if it cannot be seen): the
    owner survives a crash that leaves only the worker's copy in active/."""
    try:
        info = os.lstat(path)
    except OSError:
        return {}
    return {"uid": info.st_uid, "gid": info.st_gid}


@functools.lru_cache(maxsize=1024)
def _identity(uid: int, gid: int) -> tuple[str | None, frozenset[str]]:
    """The user's name and every group it is in (numbers and names), from the system's
    user and group data (cached: a look-up can go to the network)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return None, frozenset({str(gid)} | _group_names([gid]))
    gids = {gid, entry.pw_gid}
    with contextlib.suppress(OSError):
        gids.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return entry.pw_name, frozenset({str(g) for g in gids} | _group_names(gids))


def _group_names(gids: Iterable[int]) -> set[str]:
    names = set()
    for gid in gids:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(gid).gr_name)
    return names


def submitter(
    w: WorkerHost, envelope_id: str, source: str, known: tuple[int, int] | None
) -> Submitter:
    """Who submitted ``active/ID``: the file's owner while it is not yet the worker's copy,
    else ``known`` (from the record or the journal), else the worker. Raises
    ``EnvelopeFault`` when that owner may not submit at all."""
    info = os.lstat(w.spool.path("active", f"{envelope_id}{SUFFIX}"))
    me = os.geteuid()
    if info.st_uid != me or known is None:
        uid, gid = info.st_uid, info.st_gid
    else:
        uid, gid = known
    user, groups = _identity(uid, gid)
    who = Submitter(uid, gid, user, groups, worker=uid == me)
    fault = restrict.may_submit(who, w.cfg.submit)
    if fault is not None:
        raise EnvelopeFault(source, 1, fault)
    return who


def screened(w: WorkerHost, env: Envelope, who: Submitter) -> Envelope:
    """The envelope with its owner, without what the owner may not send (policy/restrict)."""
    cfg = w.cfg
    mailbox = f"{who.user}@{cfg.submit.qualify_domain or cfg.helo_name}" if who.user else ""
    env = restrict.screen(env, who, cfg.submit, mailbox)
    txs = tuple(replace(tx, owner_uid=who.uid) for tx in env.transactions)
    return replace(env, transactions=txs, owner=(who.uid, who.gid))
