"""``spoolsmtp deliver FILE``: one attempt for one envelope in the foreground, for operators
testing a route. Prints each recipient's outcome (and with ``-v`` the DNS and SMTP dialogue).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

from spoolsmtp.bsmtp import response
from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver, Trace
from spoolsmtp.model import exitcodes
from spoolsmtp.model.config import Config
from spoolsmtp.model.envelope import Envelope
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.spool import envfile


def format_result(res: RecipientResult) -> str:
    where = f" ({res.host}[{res.address}])" if res.host else ""
    return f"{res.recipient.address}: {res.status.value}: {res.reply.render()[0]}{where}"


def exit_code(results: list[RecipientResult]) -> int:
    """0 all delivered, 75 if any is still deferred, else 67 if any failed."""
    if any(r.status is Status.DEFERRED for r in results):
        return exitcodes.TEMPFAIL
    if any(r.status is Status.FAILED for r in results):
        return exitcodes.FAILED
    return exitcodes.OK


def deliver_file(cfg: Config, path: Path, *, verbose: bool) -> int:
    if not path.exists():
        print(f"{path}: no such file", file=sys.stderr)
        return exitcodes.NOINPUT
    try:
        with envfile.converted(path, cfg.spool, cfg.netdata, cfg.helo_name) as readable:
            return _deliver_path(cfg, readable, verbose=verbose)
    except EnvelopeFault as exc:
        print(f"{exc}; not an envelope, nothing sent", file=sys.stderr)
        return exitcodes.DATAERR


def _deliver_path(cfg: Config, path: Path, *, verbose: bool) -> int:
    try:
        env = envfile.read(path, cfg.limits, cfg.helo_name, max_file_bytes=cfg.spool.max_file_bytes)
    except EnvelopeFault as exc:
        print(f"{exc}; not an envelope, nothing sent", file=sys.stderr)
        return exitcodes.DATAERR
    for line in response.error_lines(env):
        print(line, file=sys.stderr)
    if not env.transactions:
        print(f"{path}: no transaction to send", file=sys.stderr)
        return exitcodes.DATAERR

    def trace(text: str) -> None:
        print(text, file=sys.stderr)

    return asyncio.run(_deliver(cfg, path, env, trace if verbose else None))


async def _deliver(cfg: Config, path: Path, env: Envelope, tracer: Trace | None) -> int:
    resolver = MxResolver(cfg.dns, cfg.delivery.max_addresses, cfg.delivery.port, trace=tracer)
    deliverer = Deliverer(cfg, resolver, trace=tracer)
    results: list[RecipientResult] = []
    now = datetime.now(UTC)
    try:
        for tx in env.transactions:
            for res in await deliverer.deliver(path, tx, path.name, now):
                print(format_result(res))
                results.append(res)
    finally:
        await deliverer.close_all()
    return exit_code(results)
