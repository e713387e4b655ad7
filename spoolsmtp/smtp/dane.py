"""DANE (RFC 7672) certificate checks: does the chain a server sent match its TLSA records?

Pure, given the chain as DER certificates (leaf first, as the server sent it):

* DANE-EE (usage 3): the leaf's certificate or public key matches; nothing else is checked,
  neither names nor dates (RFC 7672 3.1.1).
* DANE-TA (usage 2): some certificate of the chain matches and is the trust anchor: the leaf
  must chain to it (signatures and validity checked) and carry one of the reference names,
  the TLSA base domain first (RFC 7672 3.1.2, 3.2.2).

Parsing and chain building use ``cryptography`` 45 or later (the ``dane`` extra); ``available``
says whether it is installed, so that ``tls: dane`` is refused at start-up, not at a hop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from spoolsmtp.model.tlsdemand import Tlsa, Usage


def available() -> bool:
    try:
        import cryptography.x509.verification  # noqa: F401, PLC0415 (the dane extra)
    except ImportError:
        return False
    return True


def _selected(der: bytes, selector: int) -> bytes:
    """The bytes a TLSA selector names: the whole certificate (0) or its SubjectPublicKeyInfo."""
    if selector == 0:
        return der
    from cryptography import x509  # noqa: PLC0415 (the dane extra, imported when used)
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        Encoding,
        PublicFormat,
    )

    key = x509.load_der_x509_certificate(der).public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(der: bytes, record: Tlsa) -> bool:
    """Whether one certificate matches one TLSA record (selector and matching type applied)."""
    try:
        return _digest(_selected(der, record.selector), record.mtype) == record.data
    except ValueError:  # not a certificate cryptography can read
        return False


def check(
    chain: Sequence[bytes],
    records: Sequence[Tlsa],
    names: Sequence[str],
    now: datetime | None = None,
) -> str | None:
    """None when ``chain`` satisfies one of the usable ``records``, else why not (one line)."""
    usable = [r for r in records if r.usable]
    if not chain:
        return "the server sent no certificate"
    if not usable:
        return "no usable TLSA record"
    leaf = chain[0]
    for record in usable:
        if record.usage == Usage.DANE_EE and matches(leaf, record):
            return None
    anchors = [
        cert
        for record in usable
        if record.usage == Usage.DANE_TA
        for cert in chain
        if matches(cert, record)
    ]
    if not anchors:
        return "no certificate of the chain matches its TLSA records"
    why = "the chain does not lead to the certificate its TLSA records name"
    for anchor in anchors:
        failure = _chains_to(leaf, chain[1:], anchor, names, now or datetime.now(UTC))
        if failure is None:
            return None
        why = failure
    return why


def _chains_to(
    leaf: bytes, rest: Sequence[bytes], anchor: bytes, names: Sequence[str], now: datetime
) -> str | None:
    from cryptography import x509  # noqa: PLC0415 (the dane extra, imported when used)
    from cryptography.x509.verification import (  # noqa: PLC0415
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        Store,
        VerificationError,
    )

    try:
        certs = [x509.load_der_x509_certificate(d) for d in (leaf, *rest, anchor)]
    except ValueError:
        return "a certificate of the chain cannot be read"
    store = Store([certs[-1]])
    # as OpenSSL's DANE: signatures, validity and the name are checked, not the Web PKI's
    # extension rules (DANE-TA anchors are often private CAs); a leaf needs a subjectAltName,
    # an issuer basicConstraints
    san = ExtensionPolicy.permit_all().require_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    issuer = ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, Criticality.AGNOSTIC, None
    )
    builder: Any = (
        PolicyBuilder().store(store).time(now).extension_policies(ca_policy=issuer, ee_policy=san)
    )
    last = "the leaf certificate does not carry the expected name"
    for name in names:
        try:
            verifier = builder.build_server_verifier(x509.DNSName(name))
            verifier.verify(certs[0], certs[1:-1])
        except VerificationError as exc:
            last = f"DANE-TA chain for {name} does not verify ({exc})"
            continue
        except ValueError as exc:
            last = f"DANE-TA name {name!r} unusable ({exc})"
            continue
        return None
    return last
