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
import io
import logging
import os
import pwd
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, BinaryIO

from spoolsmtp.bsmtp import netdata, writer
from spoolsmtp.bsmtp.rewrite import Rewriter
from spoolsmtp.bsmtp.unwrap import unwrap
from spoolsmtp.model.config import RewriteConfig
from spoolsmtp.model.envelope import Envelope
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.policy import restrict
from spoolsmtp.policy.restrict import Submitter
from spoolsmtp.spool import envfile
from spoolsmtp.spool.folders import SUFFIX

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost

log = logging.getLogger("spoolsmtp")


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
    limit = w.cfg.spool.max_file_bytes
    if isinstance(opened, bytes):
        data = opened
    else:
        with opened:
            if os.fstat(opened.fileno()).st_size > limit:
                raise EnvelopeFault(source, 1, f"file larger than {limit} octets")
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


def claim_owner(path: str) -> dict[str, int]:
    """``uid``/``gid`` of ``incoming/NAME`` for its claim record ({} if it cannot be seen): the
    owner survives a crash that leaves only the worker's copy in active/."""
    owner = owner_of(path)
    return {} if owner is None else {"uid": owner[0], "gid": owner[1]}


def owner_of(path: str) -> tuple[int, int] | None:
    """The uid and gid of the file at ``path`` (not following a link); None if it is gone."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_uid, info.st_gid


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
    info = os.lstat(w.spool.file("active", f"{envelope_id}{SUFFIX}"))
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


# -- rewriting (bsmtp/rewrite.py) ---------------------------------------------------------------


_REWRITERS: dict[int, tuple[RewriteConfig, Rewriter]] = {}


def rewriter(cfg: RewriteConfig) -> Rewriter:
    """The rewriter of a configuration, built once per configuration loaded (by identity:
    the configuration holds dicts, it cannot be hashed)."""
    found = _REWRITERS.get(id(cfg))
    if found is None or found[0] is not cfg:
        _REWRITERS.clear()  # a reload: the old one is done with
        found = _REWRITERS[id(cfg)] = (
            cfg,
            Rewriter(cfg.qualify_domain, cfg.addresses, cfg.nicknames),
        )
    return found[1]


def unqualified(w: WorkerHost) -> Callable[[str], str | None] | None:
    """For the reader: what an address with no domain stands for (None: none is accepted)."""
    rw = rewriter(w.cfg.rewrite)
    return rw.unqualified if rw.active else None


def _drafts(rw: Rewriter, env: Envelope, data: bytes, ours: bool) -> list[writer.Draft] | None:
    """The transactions rewritten, or None when nothing changes. Our own reports (the
    worker's file, null sender) are left as they are."""
    changed = False
    drafts = []
    for tx in env.transactions:
        with io.BytesIO(data) as fh:
            message = b"".join(envfile.text_chunks(fh, tx.message))
        recipients = tx.recipients
        sender = tx.mail_from
        if not (ours and not tx.mail_from):
            sender = rw.address(tx.mail_from)
            recipients = tuple(replace(r, address=rw.address(r.address)) for r in recipients)
            new = rw.message(message)
            changed = changed or new != message or sender != tx.mail_from
            changed = changed or recipients != tx.recipients
            message = new
        drafts.append(writer.Draft(sender, recipients, message, tx.params))
    return drafts if changed else None


async def rewritten(
    w: WorkerHost,
    envelope_id: str,
    source: str,
    env: Envelope,
    data: bytes | None,
    who: Submitter,
) -> tuple[Envelope, bytes | None]:
    """The envelope with its addresses rewritten: if anything changes, the file in active/ is
    replaced (durably) by the rewritten envelope and that is read; the refused commands of the
    first read are kept for the batch report. Rewriting what was rewritten changes nothing,
    so a retry or a restart reads the file as it is."""
    rw = rewriter(w.cfg.rewrite)
    if not rw.active or not env.transactions:
        return env, data
    path = w.spool.path("active", f"{envelope_id}{SUFFIX}")
    raw = data if data is not None else await asyncio.to_thread(path.read_bytes)
    drafts = await asyncio.to_thread(_drafts, rw, env, raw, who.worker)
    if drafts is None:
        return env, data
    try:
        new = writer.render(drafts, env.transactions[0].helo, verbose=env.verbose)
    except writer.MessageError as exc:
        log.warning("%s: not rewritten: %s", source, exc)
        return env, data
    cfg = w.cfg
    again = envfile.read_bytes(
        new, source, cfg.limits, cfg.helo_name, cfg.spool.max_file_bytes, rw.unqualified
    )
    await w.spool.write("active", f"{envelope_id}{SUFFIX}", new, private=True)
    w._spool_trace(f"{source}: addresses rewritten")
    return replace(again, response=env.response, errors=env.errors), new
