"""``delivery.tls_min_version``: the oldest TLS version spoken to remote servers, against real
TLS servers on loopback limited to older versions."""

from __future__ import annotations

import asyncio
import ssl
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.config import Config
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.spool import envfile
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import SmtpServer


def server_up_to(version: ssl.TLSVersion) -> SmtpServer:
    """A STARTTLS server that speaks no TLS newer than ``version``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mx.test").configure_cert(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return SmtpServer(tls_context=ctx)


def deliver_one(tmp_path: Path, srv: SmtpServer, tls: str, **delivery: str) -> RecipientResult:
    cfg: Config = make_config(
        routes={"example.org": {"host": "127.0.0.1", "port": srv.port, "tls": tls}},
        delivery=delivery,
    )
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"])])
    env = envfile.read(path, cfg.limits, cfg.helo_name)

    async def run() -> RecipientResult:
        deliverer = Deliverer(cfg, MxResolver(cfg.dns))
        try:
            (result,) = await deliverer.deliver(path, env.transactions[0], "E", datetime.now(UTC))
        finally:
            await deliverer.close_all()
        return result

    return asyncio.run(run())


def test_tls_required_refuses_a_server_older_than_the_minimum(tmp_path: Path) -> None:
    srv = server_up_to(ssl.TLSVersion.TLSv1_2)
    try:
        refused = deliver_one(tmp_path, srv, "required", tls_min_version="TLSv1.3")
        assert b"MAIL FROM" not in srv.wire
        accepted = deliver_one(tmp_path, srv, "required")
    finally:
        srv.stop()
    assert (refused.status, refused.reply.enhanced) == (Status.DEFERRED, "4.7.5")
    assert accepted.status is Status.DELIVERED
    assert [m.tls for m in srv.messages] == [True]


def test_opportunistic_falls_back_to_plain_text_below_the_minimum(tmp_path: Path) -> None:
    srv = server_up_to(ssl.TLSVersion.TLSv1_2)
    try:
        result = deliver_one(tmp_path, srv, "opportunistic", tls_min_version="TLSv1.3")
    finally:
        srv.stop()
    assert result.status is Status.DELIVERED
    assert [m.tls for m in srv.messages] == [False]


def test_a_tls_1_1_server_is_refused_by_default_and_accepted_when_allowed(
    tmp_path: Path,
) -> None:
    try:
        srv = server_up_to(ssl.TLSVersion.TLSv1_1)
    except ssl.SSLError as exc:
        pytest.skip(f"this OpenSSL cannot serve TLS 1.1: {exc}")
    try:
        refused = deliver_one(tmp_path, srv, "required")
        allowed = deliver_one(tmp_path, srv, "required", tls_min_version="TLSv1.1")
    finally:
        srv.stop()
    assert (refused.status, refused.reply.enhanced) == (Status.DEFERRED, "4.7.5")
    if allowed.status is not Status.DELIVERED:
        pytest.skip(f"this OpenSSL will not speak TLS 1.1 at all: {allowed.reply}")
    assert [m.tls for m in srv.messages] == [True]


def test_a_bad_minimum_stops_start_up_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        make_config(delivery={"tls_min_version": "TLSv1.4"})
    assert "delivery.tls_min_version" in str(info.value)
    assert "TLSv1.2" in str(info.value)
