"""The TLS upgrade after the server's 220 to STARTTLS: the handshake under the policy's
context and the STARTTLS timeout, and for DANE the check of the chain the server sent against
its TLSA records (``dane.py``). The session sends STARTTLS and decides what a failure means.
"""

from __future__ import annotations

import _ssl
import asyncio
import ssl

from spoolsmtp.model.config import DeliveryConfig, TlsPolicy
from spoolsmtp.model.tlsdemand import TlsDemand
from spoolsmtp.smtp import dane
from spoolsmtp.smtp.transport import Wire, tls_context


class HandshakeFailed(Exception):
    """The TLS handshake did not complete; ``detail`` is ``": reason"`` or ``""``."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


async def upgrade(
    transport: asyncio.Transport,
    wire: Wire,
    tls: TlsPolicy,
    config: DeliveryConfig,
    ca_file: str | None,
    host: str,
    demand: TlsDemand | None,
) -> tuple[asyncio.Transport, str | None]:
    """The TLS transport, and why its certificate does not match the DANE ``demand`` (None
    when it does, or there is none). ``HandshakeFailed`` when there is no TLS at all."""
    context = tls_context(tls, config.tls_min_version, ca_file)
    try:
        async with asyncio.timeout(config.timeouts.starttls):
            upgraded = await asyncio.get_running_loop().start_tls(
                transport, wire, context, server_hostname=host
            )
    except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise HandshakeFailed(f": {reason}") from exc
    if upgraded is None:
        raise HandshakeFailed("")
    mismatch = None
    if demand is not None and demand.tlsa:
        mismatch = dane.check(peer_chain(upgraded), demand.tlsa, demand.names)
    return upgraded, mismatch


def peer_chain(transport: asyncio.BaseTransport) -> list[bytes]:
    """The certificates the server sent, leaf first, as DER (for DANE, which checks them
    itself). Python 3.13 has ``get_unverified_chain``; before it, the same method exists on the
    ``_ssl`` object underneath; without either, the leaf alone (DANE-EE still works)."""
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return []
    for owner in (obj, getattr(obj, "_sslobj", None)):
        method = getattr(owner, "get_unverified_chain", None)
        if method is not None:
            der = _ssl.ENCODING_DER
            return [c if isinstance(c, bytes) else c.public_bytes(der) for c in method() or []]
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []
