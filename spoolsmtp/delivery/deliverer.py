"""One delivery attempt of a transaction: route, resolve, try each host in order, send.

The ``Deliverer`` owns the connection pool and the concurrency limits (overall and per
destination; a destination's limit is kept only while it is in use). Within one attempt every
hop of a destination is tried in order, a plain loop, before a recipient counts as deferred;
retries over hours are the spool's business, not this module's.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import BinaryIO

from spoolsmtp.delivery import route, tlsplan, wiresecrets
from spoolsmtp.delivery.limits import DestinationLimits
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.delivery.tlsplan import HopTls, TlsPlanner
from spoolsmtp.model.config import Config, TlsPolicy
from spoolsmtp.model.envelope import Recipient, Transaction
from spoolsmtp.model.hop import Hop, always
from spoolsmtp.model.login import Login
from spoolsmtp.model.outcome import RecipientResult, Status, decided_here, result
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.model.stats import SessionStats
from spoolsmtp.model.tlsdemand import TlsDemand
from spoolsmtp.smtp import outgoing
from spoolsmtp.smtp.broken import StaleSession
from spoolsmtp.smtp.dotmark import DotHook, MarkAhead
from spoolsmtp.smtp.session import Session
from spoolsmtp.spool import crashpoint, envfile

Trace = Callable[[str], None]
_PoolKey = tuple[str, int, str, TlsPolicy, TlsDemand | None, str | None]
_NO_HOST = make(451, "4.4.0", "no host tried")


class PartlyDelivered(Exception):
    """``error`` ended a delivery (the journal's disk full at a dot) after part of the
    transaction was decided: ``results`` are that part (the other destinations', each run to
    its end; the failed destination's earlier transactions, a 452 split, or hosts). The
    caller journals them (what a server accepted is not sent again), then raises ``error``."""

    def __init__(self, error: Exception, results: list[RecipientResult]) -> None:
        super().__init__(str(error))
        self.error = error
        self.results = results


def fold_received(parts: Iterator[str] | list[str]) -> bytes:
    """A Received header folded at 78 columns, CRLF-terminated."""
    lines: list[str] = []
    current = "Received:"
    for part in parts:
        if len(current) + 1 + len(part) > 78 and current.strip() != "Received:":
            lines.append(current)
            current = "\t" + part
        else:
            current += " " + part
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def received_header(
    tx: Transaction, envelope_id: str, hostname: str, now: datetime, recipients: list[Recipient]
) -> bytes:
    """The one header we add: where the message came from and when we took it."""
    parts = [f"from {tx.helo or 'unknown'}", f"by {hostname}", "(spoolsmtp)", "with BSMTP"]
    if tx.owner_uid is not None:  # who wrote the file, as Postfix's pickup says it
        parts.insert(1, f"(uid {tx.owner_uid})")
    parts.append(f"id {envelope_id}.{tx.number}")
    if len(recipients) == 1:
        parts.append(f"for <{recipients[0].address}>;")
    else:
        parts[-1] += ";"
    parts.append(date_text(now))
    return fold_received(parts)


def date_text(now: datetime) -> str:
    """``format_datetime(now)``, formatted once per second: every message of the second
    shares it. The offset is part of the key, as equal instants in other zones read apart."""
    return _formatted(now.replace(microsecond=0), now.utcoffset())


@functools.lru_cache(maxsize=4)
def _formatted(now: datetime, offset: timedelta | None) -> str:
    return format_datetime(now)


def usable(cfg: Config) -> wiresecrets.Secrets:
    """What delivering under ``cfg`` needs that reading the file cannot check: ``tls: dane``
    with its extra installed, and the logins and DKIM keys it names (read, mode checked).
    ConfigError naming the key; start-up, ``--check-config`` and every RELOAD ask here."""
    tlsplan.require_dane_support(cfg)
    return wiresecrets.load(cfg)


class Deliverer:
    """Sends transactions to their destinations; one per worker, shared by all envelopes."""

    def __init__(
        self,
        cfg: Config,
        resolver: MxResolver,
        trace: Trace | None = None,
        tracing: Callable[[], bool] = always,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.secrets = usable(cfg)
        self.cfg = cfg
        self.tls = TlsPlanner(cfg, resolver, warn, self._trace_session)
        self._resolver = resolver
        self.trace = trace
        self.tracing = tracing
        self.stats = SessionStats()
        self.router = route.Router(cfg)
        self._overall = asyncio.Semaphore(cfg.delivery.max_connections)
        self._overall_deck = asyncio.Semaphore(2 * cfg.delivery.max_connections)
        self._per_destination = DestinationLimits(cfg.delivery.max_per_destination)
        self._idle: dict[_PoolKey, list[Session]] = {}

    @property
    def resolver(self) -> MxResolver:
        return self._resolver

    @resolver.setter
    def resolver(self, resolver: MxResolver) -> None:
        """A new resolver (RELOAD of DNS settings) serves the MTA-STS and TLSA look-ups too."""
        self._resolver = self.tls.resolver = self.tls.sts.resolver = resolver

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded configuration: routes and timeouts apply to the next delivery (the
        remembered routes are those of the old one, so they go too). The logins are read
        again first: a bad ``delivery.auth_file`` raises ConfigError and changes nothing."""
        secrets = usable(cfg)
        self.cfg = cfg
        self.secrets = secrets
        self.router = route.Router(cfg)
        self.tls.reconfigure(cfg)

    async def deliver(
        self,
        path: Path,
        tx: Transaction,
        envelope_id: str,
        now: datetime,
        recipients: list[Recipient] | None = None,
        before_dot: DotHook | None = None,
        data: bytes | None = None,
    ) -> list[RecipientResult]:
        """One attempt for ``recipients`` (default: all of the transaction's); a result each.

        ``data``, when given, is the whole envelope file already read: the message is sent
        from it instead of from ``path``."""
        rcpts = list(tx.recipients if recipients is None else recipients)
        if tx.message.received + 1 > self.cfg.limits.max_hops:
            loop = make(554, "5.4.6", f"mail loop: more than {self.cfg.limits.max_hops} hops")
            return [decided_here(r, loop) for r in rcpts]
        groups = self.router.group(rcpts)
        if len(groups) == 1:
            ((dest, group),) = groups.items()
            outcomes = [
                await self.deliver_to(dest, group, path, tx, envelope_id, now, before_dot, data)
            ]
        else:
            # every destination's delivery ends before this does, even when one fails (the
            # journal full at its dot): the caller then puts the envelope back and takes what
            # the journal knows of it, and a delivery left running could send a dot after that
            # (its recipients sent again, unflagged). What the others did comes with the error
            # (PartlyDelivered), for the caller to journal before it puts the envelope back.
            settled = await asyncio.gather(
                *(
                    self.deliver_to(dest, group, path, tx, envelope_id, now, before_dot, data)
                    for dest, group in groups.items()
                ),
                return_exceptions=True,
            )
            outcomes = [o for o in settled if not isinstance(o, BaseException)]
            errors = [o for o in settled if isinstance(o, BaseException)]
            if errors:
                # what the failed destinations had finished comes along too
                done = [r for results in outcomes for r in results]
                for e in errors:
                    if isinstance(e, PartlyDelivered):
                        done.extend(e.results)
                # an error of ours (the disk full) before a branch's cancellation, so that
                # the caller puts the envelope back and sees the disk full
                error = next((e for e in errors if isinstance(e, Exception)), errors[0])
                if isinstance(error, PartlyDelivered):
                    error = error.error
                if done and isinstance(error, Exception):
                    raise PartlyDelivered(error, done) from error
                raise error
        by_rcpt = {r.recipient: r for results in outcomes for r in results}
        return [by_rcpt[r] for r in rcpts]

    async def deliver_to(
        self,
        dest: route.Destination,
        rcpts: list[Recipient],
        path: Path,
        tx: Transaction,
        envelope_id: str,
        now: datetime,
        before_dot: DotHook | None = None,
        data: bytes | None = None,
    ) -> list[RecipientResult]:
        """One attempt for recipients that share a destination; each result says how long
        it took to set up and to transmit (``_timed``).

        The transaction's mark (``before_dot``) is begun on deck: once the delivery is among
        the next in line for the destination's places (``DestinationLimits.deck``, and the
        overall limit's deck), before it has one, so the mark's commit runs while the
        connection it will get still carries the transaction before. At most as many
        deliveries wait marked on deck as hold a place."""
        started = time.monotonic()
        async with self._per_destination.deck(dest.key), self._overall_deck:
            ahead = MarkAhead(before_dot, rcpts) if before_dot is not None else None
            try:
                async with self._per_destination.hold(dest.key), self._overall:
                    return await self._deliver_held(
                        dest, rcpts, path, tx, envelope_id, now, ahead, data, started
                    )
            finally:
                if ahead is not None:
                    ahead.unused()

    async def _deliver_held(
        self,
        dest: route.Destination,
        rcpts: list[Recipient],
        path: Path,
        tx: Transaction,
        envelope_id: str,
        now: datetime,
        before_dot: DotHook | None,
        data: bytes | None,
        started: float,
    ) -> list[RecipientResult]:
        """``deliver_to`` once the destination's place is had: each hop in order."""
        sending = [0.0]  # seconds inside session.send, added up by _try_hop
        resolution = await self.resolver.hops(dest)
        if resolution.failure is not None:
            return _timed([decided_here(r, resolution.failure) for r in rcpts], started, 0.0)
        hops = resolution.hops
        policy = await self.tls.policy(dest)
        received = received_header(tx, envelope_id, self.cfg.helo_name, now, rcpts)
        done: dict[Recipient, RecipientResult] = {}
        latest: dict[Recipient, RecipientResult] = {}
        pending = list(rcpts)
        with envfile.open_text(path, data) as fh:
            for hop in hops:
                how = await self.tls.hop(dest, resolution.secure, policy, hop)
                if isinstance(how, Reply):
                    for r in pending:
                        latest[r] = result(r, how, hop.host, hop.address)
                    continue
                try:
                    pending = await self._try_hop(
                        hop,
                        dest,
                        how,
                        tx,
                        pending,
                        fh,
                        received,
                        done,
                        latest,
                        before_dot,
                        sending,
                    )
                except Exception as exc:
                    # what an earlier hop or transaction (the 452 split) decided stands
                    if done:
                        raise PartlyDelivered(exc, list(done.values())) from exc
                    raise
                if not pending:
                    break
        for r in pending:
            done[r] = latest.get(r) or result(r, _NO_HOST)
        return _timed([done[r] for r in rcpts], started, sending[0])

    async def _try_hop(
        self,
        hop: Hop,
        dest: route.Destination,
        tls: HopTls,
        tx: Transaction,
        pending: list[Recipient],
        fh: BinaryIO,
        received: bytes,
        done: dict[Recipient, RecipientResult],
        latest: dict[Recipient, RecipientResult],
        before_dot: DotHook | None,
        sending: list[float],
    ) -> list[Recipient]:
        """Send to one hop; record final results; return the recipients still to try.
        ``sending[0]``: the seconds spent in ``Session.send``, added to."""
        session, failure = await self._session(hop, dest, tls)
        if session is None:
            assert failure is not None
            for r in pending:
                latest[r] = result(r, failure, hop.host, hop.address)
            return pending
        text = functools.partial(envfile.wire_chunks, fh, tx.message)
        todo = pending
        left: list[Recipient] = []
        while todo:
            sent_at = time.monotonic()
            try:
                # THE BYTES TO SEND, decided here for this connection with the config and
                # keys of now: as stored, or converted to 7 bit and/or signed (outgoing.py)
                out = outgoing.decide(
                    tx,
                    session.extensions,
                    received,
                    text,
                    self.cfg.delivery.mime_conversion,
                    self.secrets.signer,
                    session.where,
                )
                verbatim = envfile.verbatim(fh, tx.message)
                results, again = await session.send(out, todo, before_dot, verbatim)
            except StaleSession:
                session, failure = await self._session(hop, dest, tls, reuse=False)
                if session is None:
                    assert failure is not None
                    for r in todo:
                        latest[r] = result(r, failure, hop.host, hop.address)
                    return [*left, *todo]
                continue
            except BaseException:
                # anything else (the journal could not be written, a cancellation): the
                # session is in an unknown state; it is closed, never left open and unpooled
                session.abort()
                raise
            finally:
                sending[0] += time.monotonic() - sent_at
            for res in results:
                latest[res.recipient] = res
                final = res.status is not Status.DEFERRED or res.after_dot
                if final and res.recipient not in again:
                    done[res.recipient] = res
                elif res.recipient not in again:
                    left.append(res.recipient)
            progress = len(again) < len(todo)
            todo = again if again and session.alive and progress else []
            if again and not todo:
                left.extend(again)
        self._release(session)
        return left

    async def _session(
        self, hop: Hop, dest: route.Destination, tls: HopTls, *, reuse: bool = True
    ) -> tuple[Session | None, Reply | None]:
        """A ready session to ``hop``: an idle pooled one (RSET only if a transaction was left
        incomplete; after a final reply to the dot the server is ready again) or a new one.
        A route with ``auth`` logs in; its sessions are pooled apart from others, as are those
        with another TLS requirement (DANE, MTA-STS)."""
        login = self._login(dest)
        key: _PoolKey = (hop.address, hop.port, hop.host, *tls, login.name if login else None)
        idle = self._idle.get(key, []) if reuse else []
        now = time.monotonic()
        while idle:
            session = idle.pop()
            fresh = now - session.last_used < self.cfg.delivery.idle_timeout
            if session.alive and fresh and (not session.dirty or await session.reset()):
                self.stats.reused += 1
                return session, None
            await session.close()
        session = Session(
            hop,
            self.cfg.delivery,
            self.cfg.helo_name,
            tls[0],
            demand=tls[1],
            trace=self._trace_session,
            tracing=self._session_tracing,
            stats=self.stats,
            ca_file=str(self.cfg.delivery.tls_ca_file) if self.cfg.delivery.tls_ca_file else None,
            reach=crashpoint.reach,
            login=login,
            auth_plaintext=dest.route is not None and dest.route.auth_plaintext,
        )
        failure = await session.open()
        if failure is not None:
            return None, failure
        return session, None

    def _release(self, session: Session) -> None:
        if self.cfg.delivery.reuse_connections and session.alive:
            hop, login = session.hop, session.login
            key: _PoolKey = (
                hop.address,
                hop.port,
                hop.host,
                session.tls,
                session.demand,
                login.name if login else None,
            )
            self._idle.setdefault(key, []).append(session)
        else:
            session.abort()

    async def close_idle(self, older_than: float | None = None) -> int:
        """Close pooled connections idle longer than ``older_than`` (default: the idle timeout)."""
        limit = self.cfg.delivery.idle_timeout if older_than is None else older_than
        now = time.monotonic()
        closed = 0
        for key, sessions in list(self._idle.items()):
            keep = []
            for session in sessions:
                if now - session.last_used >= limit or not session.alive:
                    await session.close()
                    closed += 1
                else:
                    keep.append(session)
            self._idle[key] = keep
        return closed

    async def close_all(self) -> None:
        await self.close_idle(older_than=-1.0)

    def _login(self, dest: route.Destination) -> Login | None:
        name = dest.route.auth if dest.route is not None else None
        return self.secrets.logins[name] if name is not None else None

    def _session_tracing(self) -> bool:
        """Whether a session's trace lines go anywhere: not without a ``trace`` (so a session
        does not format lines only to drop them)."""
        return self.trace is not None and self.tracing()

    def _trace_session(self, text: str) -> None:
        if self.trace is not None:
            self.trace(text)


def _timed(results: list[RecipientResult], started: float, sending: float) -> list[RecipientResult]:
    """The results with the attempt's set-up time (all but the sending) and sending time."""
    setup = max(0.0, time.monotonic() - started - sending)
    return [r.timed(setup, sending) for r in results]
