"""What one hop's TLS must prove beyond the TLS policy: DANE TLSA records (RFC 7672) or the
names an MTA-STS policy (RFC 8461) requires the certificate to carry.

Values only, shared by the layer that decides them (delivery: DNS and policy look-ups) and the
one that checks them during the handshake (smtp: the session), so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Usage(IntEnum):
    """TLSA certificate usages (RFC 6698); SMTP uses only DANE-TA and DANE-EE (RFC 7672 3.1)."""

    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record: usage, selector (0 whole certificate, 1 public key), matching type
    (0 exact, 1 SHA-256, 2 SHA-512) and the association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """Usable for SMTP (RFC 7672 3.1): usage 2 or 3, a known selector and matching type."""
        return (
            self.usage in (Usage.DANE_TA, Usage.DANE_EE)
            and self.selector in (0, 1)
            and self.mtype in (0, 1, 2)
        )

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}..."


@dataclass(frozen=True)
class TlsDemand:
    """A hop's TLS requirement: ``tlsa`` (DANE: the peer's chain must match one of them, and
    for DANE-TA its leaf must carry one of ``names``), or ``names`` alone (MTA-STS enforce:
    a chain valid to the trusted CAs for one of these names). ``source`` says which, for the
    replies and the trace (``"dane"`` or ``"mta-sts"``)."""

    source: str
    tlsa: tuple[Tlsa, ...] = ()
    names: tuple[str, ...] = ()
