"""Peers for the DANE and MTA-STS tests: a signed loopback DNS zone, a STARTTLS SMTP server
with a certificate made for the test, and an HTTPS server for MTA-STS policies."""

from __future__ import annotations

import hashlib
import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.smtpservers import SmtpServer


def server_context(ca: trustme.CA, name: str, with_anchor: bool = False) -> ssl.SSLContext:
    """A server context with a certificate for ``name`` issued by ``ca``; ``with_anchor``
    sends the CA's certificate in the chain too (as DANE-TA servers must, RFC 7672 3.2.1)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf = ca.issue_cert(name)
    leaf.configure_cert(ctx)
    if with_anchor:
        with (
            leaf.private_key_pem.tempfile() as key,
            trustme.Blob(
                b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes()
            ).tempfile() as chain,
        ):
            ctx.load_cert_chain(chain, key)
    return ctx


def leaf_der(ctx_ca: trustme.CA, name: str) -> tuple[ssl.SSLContext, bytes]:
    """A server context for ``name`` and the DER of its certificate (for TLSA data)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf = ctx_ca.issue_cert(name)
    leaf.configure_cert(ctx)
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    return ctx, der


def tlsa_3_1_1(der: bytes) -> str:
    """The TLSA record text DANE-EE, SPKI, SHA-256 of a certificate."""
    key = x509.load_der_x509_certificate(der).public_key()
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


def tlsa_2_0_1(ca: trustme.CA) -> str:
    """DANE-TA, whole certificate, SHA-256, of the CA's certificate."""
    der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(Encoding.DER)
    return f"2 0 1 {hashlib.sha256(der).hexdigest()}"


def tls_server(ctx: ssl.SSLContext, port: int = 0) -> SmtpServer:
    return SmtpServer(tls_context=ctx, port=port)


@dataclass
class PolicyServer:
    """What the HTTPS policy server serves, and what it was asked."""

    body: bytes = b""
    content_type: str = "text/plain"
    status: int = 200
    requests: list[str] = field(default_factory=list)


@contextmanager
def https_policy_server(
    ca: trustme.CA, host_name: str, address: str, policy: PolicyServer
) -> Iterator[PolicyServer]:
    """HTTPS on ``address``:443 (RFC 8461 fixes the port: the tests give each server its own
    loopback address, so no two collide), answering every GET with ``policy``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            policy.requests.append(self.path)
            self.send_response(policy.status)
            self.send_header("Content-Type", policy.content_type)
            self.send_header("Content-Length", str(len(policy.body)))
            self.end_headers()
            self.wfile.write(policy.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host_name).configure_cert(ctx)
    httpd = http.server.ThreadingHTTPServer((address, 443), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield policy
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def ca_file(ca: trustme.CA, folder: Path) -> Path:
    path = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
