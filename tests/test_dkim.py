"""DKIM signing of what we send: delivered messages verified with dkimpy against the public key
served by the loopback DNS server; the key file's mode; dkimpy missing."""

from __future__ import annotations

import base64
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.outcome import Status
from spoolsmtp.smtp.sevenbit import eight_bit
from tests.dnsserver import Zone, serve
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import Script, SmtpServer
from tests.test_delivery import deliver
from tests.test_wire_transforms import MIME_8BIT

MESSAGE = (
    b"From: Batch Reports <batch@example.com>\r\nTo: a@example.org\r\n"
    b"Subject: nightly run\r\nDate: Tue, 01 Dec 2026 05:00:00 +0000\r\n"
    b"Message-ID: <run.1@example.com>\r\n\r\nJob BACKUP ended RC=0000\r\n.dot line\r\n"
)


@pytest.fixture(scope="module")
def key_pair() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(public).decode()


@pytest.fixture(scope="module")
def dkim_dns(key_pair: tuple[bytes, str]) -> Iterator[int]:
    """The loopback DNS server publishing the public key at s2026._domainkey.example.com."""
    record = f"v=DKIM1; k=rsa; p={key_pair[1]}"
    chunks = " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200))
    zone = Zone()
    zone.add("s2026._domainkey.example.com", "TXT", chunks)
    with serve(zone) as port:
        yield port


def verify(message: bytes, dns_port: int) -> bool:
    """dkimpy's verification, its key looked up on our loopback DNS server (not the internet)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(r.strings) for r in answer)

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


def key_file(tmp_path: Path, private: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "example.com.pem"
    path.write_bytes(private)
    path.chmod(mode)
    return path


def send(tmp_path: Path, srv: SmtpServer, message: bytes, key: Path, **sections: Any) -> bytes:
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("batch@example.com", ["a@example.org"], message)])
    cfg = make_config(
        routes={"example.org": f"127.0.0.1:{srv.port}"},
        dkim={"example.com": {"selector": "s2026", "key_file": str(key)}},
        **sections,
    )
    (res,), _, _ = deliver(cfg, path)
    assert res.status is Status.DELIVERED, res.reply
    (got,) = srv.messages
    return got.content


@pytest.fixture
def sink() -> Iterator[SmtpServer]:
    srv = SmtpServer()
    yield srv
    srv.stop()


def test_what_we_send_verifies_against_the_published_key(
    tmp_path: Path, key_pair: tuple[bytes, str], dkim_dns: int, sink: SmtpServer
) -> None:
    content = send(tmp_path, sink, MESSAGE, key_file(tmp_path, key_pair[0]))
    assert content.startswith(b"DKIM-Signature: ")
    assert verify(content, dkim_dns)
    head = content.split(b"\r\n\r\n", 1)[0]
    signature = head.split(b"\r\nReceived:", 1)[0].replace(b"\r\n", b"").replace(b" ", b"")
    assert b"c=relaxed/relaxed" in signature and b"d=example.com" in signature
    tags = dict(t.split(b"=", 1) for t in signature.split(b";") if b"=" in t)
    signed = tags[b"h"].lower().split(b":")
    assert {b"from", b"to", b"subject", b"date", b"message-id"} <= set(signed)
    assert b"received" not in signed
    # a changed body no longer verifies: the check is real
    assert not verify(content.replace(b"RC=0000", b"RC=0012"), dkim_dns)


def test_the_signature_covers_the_7bit_conversion(
    tmp_path: Path, key_pair: tuple[bytes, str], dkim_dns: int
) -> None:
    srv = SmtpServer(Script(drop_extensions=["8BITMIME"]))
    try:
        content = send(tmp_path, srv, MIME_8BIT, key_file(tmp_path, key_pair[0]))
    finally:
        srv.stop()
    assert not eight_bit(content)
    assert b"quoted-printable" in content
    assert verify(content, dkim_dns)


def test_mail_from_another_domain_goes_unsigned(
    tmp_path: Path, key_pair: tuple[bytes, str], sink: SmtpServer
) -> None:
    other = MESSAGE.replace(b"batch@example.com", b"ops@example.net")
    content = send(tmp_path, sink, other, key_file(tmp_path, key_pair[0]))
    assert content.startswith(b"Received: ")
    assert b"DKIM-Signature" not in content


def test_only_what_is_signed_is_taken_out_of_the_file(
    tmp_path: Path, key_pair: tuple[bytes, str], sink: SmtpServer
) -> None:
    """With keys configured, a message no key applies to still goes out as the file holds
    it (its header alone is read to tell); a signed one is sent from memory."""
    key = key_file(tmp_path, key_pair[0])
    cfg = make_config(
        routes={"example.org": f"127.0.0.1:{sink.port}"},
        dkim={"example.com": {"selector": "s2026", "key_file": str(key)}},
    )
    plain = MESSAGE.replace(b".dot line", b"no dot to stuff")  # as the file holds it: verbatim
    other = plain.replace(b"batch@example.com", b"ops@example.net")
    sent = {}
    for name, message in (("signed", plain), ("other", other)):
        path = tmp_path / f"{name}.bsmtp"
        write_envelope(path, [draft("batch@example.com", ["a@example.org"], message)])
        (res,), deliverer, _ = deliver(cfg, path)
        assert res.status is Status.DELIVERED, res.reply
        sent[name] = deliverer.stats.verbatim
    assert sent == {"signed": 0, "other": 1}
    signed, other = (m.content for m in sink.messages)
    assert signed.startswith(b"DKIM-Signature: ") and b"DKIM-Signature" not in other


def test_a_key_file_others_can_read_stops_start_up(
    tmp_path: Path, key_pair: tuple[bytes, str]
) -> None:
    path = key_file(tmp_path, key_pair[0], 0o640)
    cfg = make_config(dkim={"example.com": {"selector": "s2026", "key_file": str(path)}})
    with pytest.raises(ConfigError) as info:
        Deliverer(cfg, MxResolver(cfg.dns))
    assert "dkim.example.com.key_file" in str(info.value)
    assert f"{path}: refusing a secret file" in str(info.value)
    path.write_bytes(b"not a key\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"dkim\.example\.com\.key_file: .*cannot sign"):
        Deliverer(cfg, MxResolver(cfg.dns))


def test_dkim_configured_without_dkimpy_stops_start_up(
    tmp_path: Path, key_pair: tuple[bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "dkim", None)  # import dkim now raises ImportError
    cfg = make_config(
        dkim={"example.com": {"selector": "s2026", "key_file": str(key_file(tmp_path, b"x"))}}
    )
    with pytest.raises(ConfigError) as info:
        Deliverer(cfg, MxResolver(cfg.dns))
    assert "dkim.example.com: needs dkimpy" in str(info.value)
