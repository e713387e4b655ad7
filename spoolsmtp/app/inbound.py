"""What comes in, before it is read as an envelope: a NETDATA file (TSO TRANSMIT, CMS SENDFILE
or NOTE) in active/ is unwrapped into the Batch SMTP envelope it carries, once, right after the
claim; the envelope file is replaced by the result (durably), so a retry or a restart reads the
unwrapped envelope and never unwraps twice (Batch SMTP text never looks like NETDATA).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, BinaryIO

from spoolsmtp.bsmtp import netdata
from spoolsmtp.bsmtp.unwrap import unwrap
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
