"""SMTP AUTH to a route or smarthost (PLAIN, LOGIN), against aiosmtpd servers with an
authenticator, over TLS from trustme certificates; and the logins file's mode check."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from spoolsmtp.app import cli
from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.spool import envfile
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import SmtpServer

NOW = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
PASSWORD = "correct horse"


class Authenticator:
    """Accepts batch/PASSWORD; answers ``answer`` (e.g. a 454) instead when it is set."""

    def __init__(self, answer: str | None = None) -> None:
        self.answer = answer
        self.tried: list[tuple[str, str, str]] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.tried.append((mechanism, data.login.decode(), data.password.decode()))
        if self.answer is not None:
            return AuthResult(success=False, handled=False, message=self.answer)
        ok = (data.login, data.password) == (b"batch", PASSWORD.encode())
        return AuthResult(success=ok, handled=False, auth_data=data)


@pytest.fixture(scope="module")
def tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mx.test").configure_cert(ctx)
    return ctx


def logins(tmp_path: Path, password: str = PASSWORD, mode: int = 0o600) -> Path:
    path = tmp_path / "logins.yaml"
    path.write_text(f'relay: {{username: batch, password: "{password}"}}\n')
    path.chmod(mode)
    return path


def deliver(
    tmp_path: Path,
    srv: SmtpServer,
    *,
    tls: str = "required",
    trace: list[str] | None = None,
    password: str = PASSWORD,
    **route: Any,
) -> RecipientResult:
    cfg = make_config(
        smarthost={"host": "127.0.0.1", "port": srv.port, "tls": tls, "auth": "relay", **route},
        delivery={"auth_file": str(logins(tmp_path, password))},
    )
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"])])
    env = envfile.read(path, cfg.limits, cfg.helo_name)

    async def run() -> RecipientResult:
        deliverer = Deliverer(cfg, MxResolver(cfg.dns), trace=trace.append if trace else None)
        try:
            (res,) = await deliverer.deliver(path, env.transactions[0], "E", NOW)
        finally:
            await deliverer.close_all()
        return res

    return asyncio.run(run())


@pytest.fixture
def server(tls: ssl.SSLContext) -> Iterator[tuple[SmtpServer, Authenticator]]:
    check = Authenticator()
    srv = SmtpServer(tls_context=tls, authenticator=check, auth_require_tls=True)
    yield srv, check
    srv.stop()


def test_plain_login_over_tls_then_delivery(
    tmp_path: Path, server: tuple[SmtpServer, Authenticator]
) -> None:
    srv, check = server
    trace = ["start"]
    res = deliver(tmp_path, srv, trace=trace)
    assert res.status is Status.DELIVERED, res.reply
    assert check.tried == [("PLAIN", "batch", PASSWORD)]
    assert [m.tls for m in srv.messages] == [True]
    assert any("AUTH PLAIN (credentials)" in line for line in trace)
    assert not any("Y29ycmVjdCBob3JzZQ" in line or PASSWORD in line for line in trace)


def test_login_mechanism_when_plain_is_not_offered(tmp_path: Path, tls: ssl.SSLContext) -> None:
    check = Authenticator()
    srv = SmtpServer(tls_context=tls, authenticator=check, auth_exclude_mechanism=["PLAIN"])
    try:
        res = deliver(tmp_path, srv)
    finally:
        srv.stop()
    assert res.status is Status.DELIVERED, res.reply
    assert check.tried == [("LOGIN", "batch", PASSWORD)]


def test_535_fails_the_route_with_the_reply_and_sends_no_mail(
    tmp_path: Path, server: tuple[SmtpServer, Authenticator]
) -> None:
    srv, check = server
    res = deliver(tmp_path, srv, password="wrong")
    assert check.tried == [("PLAIN", "batch", "wrong")]
    assert res.status is Status.FAILED
    assert (res.reply.code, res.reply.enhanced) == (535, "5.7.8")
    assert "refused login 'relay': Authentication credentials invalid" in res.reply.text
    assert srv.messages == []
    assert b"MAIL FROM" not in srv.wire


def test_454_defers(tmp_path: Path, tls: ssl.SSLContext) -> None:
    srv = SmtpServer(
        tls_context=tls, authenticator=Authenticator("454 4.7.0 Temporary authentication failure")
    )
    try:
        res = deliver(tmp_path, srv)
    finally:
        srv.stop()
    assert res.status is Status.DEFERRED
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.0")
    assert srv.messages == []


def test_no_credentials_without_tls_unless_the_route_allows_it(tmp_path: Path) -> None:
    check = Authenticator()
    srv = SmtpServer(authenticator=check, auth_require_tls=False)  # no STARTTLS at all
    try:
        refused = deliver(tmp_path, srv, tls="opportunistic")
        assert b"AUTH" not in srv.wire and b"MAIL" not in srv.wire
        allowed = deliver(tmp_path, srv, tls="opportunistic", auth_plaintext=True)
    finally:
        srv.stop()
    assert (refused.status, refused.reply.code, refused.reply.enhanced) == (
        Status.DEFERRED,
        451,
        "4.7.4",
    )
    assert "without TLS" in refused.reply.text
    assert allowed.status is Status.DELIVERED, allowed.reply
    assert check.tried == [("PLAIN", "batch", PASSWORD)]


def test_a_logins_file_others_can_read_stops_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = logins(tmp_path, mode=0o644)
    conf = tmp_path / "c.yaml"
    conf.write_text(
        f"spool: {{path: {tmp_path / 'spool'}}}\n"
        f"delivery: {{auth_file: {path}}}\n"
        "smarthost: {host: 127.0.0.1, port: 2525, auth: relay}\n"
    )
    assert cli.main(["run", "--config", str(conf), "--check-config"]) == 78
    err = capsys.readouterr().err
    assert f"{conf}: delivery.auth_file: {path}: refusing a secret file" in err
    assert "mode 0644" in err
    # the real start-up, in its own process (``run`` sets the umask of the process it runs in)
    started = subprocess.run(
        [sys.executable, "-m", "spoolsmtp", "run", "--config", str(conf)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert started.returncode == 78, started.stderr
    assert started.stderr.count("\n") == 1
    assert f"delivery.auth_file: {path}: refusing a secret file" in started.stderr
    envelope = tmp_path / "e.bsmtp"
    write_envelope(envelope, [draft("o@example.com", ["a@example.org"])])
    assert cli.main(["deliver", "--config", str(conf), str(envelope)]) == 78
    assert "config error: " in capsys.readouterr().err
    path.chmod(0o600)
    assert cli.main(["run", "--config", str(conf), "--check-config"]) == 0


def test_a_route_naming_a_missing_login_stops_start_up(tmp_path: Path) -> None:
    cfg = make_config(
        routes={"example.org": {"host": "127.0.0.1", "auth": "nobody"}},
        delivery={"auth_file": str(logins(tmp_path))},
    )
    with pytest.raises(ConfigError) as info:
        Deliverer(cfg, MxResolver(cfg.dns))
    assert "routes.example.org.auth" in str(info.value)
    assert "no login 'nobody'" in str(info.value)


def test_a_worker_records_the_535_of_a_smarthost_named_localhost(
    tmp_path: Path, server: tuple[SmtpServer, Authenticator]
) -> None:
    """End to end: a worker whose smarthost is ``localhost`` (found in /etc/hosts, the DNS
    server knowing nothing) logs in with a wrong password; the record shows the 535."""
    from tests.dnsserver import Zone, serve
    from tests.helpers import draft
    from tests.workerproc import WorkerProcess, wait_for

    srv, check = server
    settings = {
        "smarthost": {"host": "localhost", "port": srv.port, "tls": "required", "auth": "relay"},
        "delivery": {"auth_file": str(logins(tmp_path, "wrong"))},
        # the report of the failure would log in once more on its way to o@example.com
        "bounces": {"requeue": False},
    }
    with serve(Zone()) as dns_port:
        settings["dns"] = {"nameservers": ["127.0.0.1"], "port": dns_port}
        w = WorkerProcess(tmp_path, settings).start()
        try:
            w.drop_drafts("j.bsmtp", [draft("o@example.com", ["a@example.org"])])
            rec = wait_for(lambda: w.final("j.bsmtp"), what="j.bsmtp final")
        finally:
            assert w.stop() == 0
    rcpt = rec["transactions"][0]["recipients"][0]
    assert rcpt["status"] == "failed"
    assert rcpt["reply"]["code"] == 535
    assert "localhost[127.0.0.1]" in rcpt["reply"]["text"]
    assert "refused login 'relay'" in rcpt["reply"]["text"]
    assert check.tried == [("PLAIN", "batch", "wrong")]
    assert srv.messages == []


def test_reload_refuses_an_unsafe_logins_file_and_takes_it_once_safe(
    tmp_path: Path, server: tuple[SmtpServer, Authenticator]
) -> None:
    import yaml

    from tests.helpers import draft
    from tests.workerproc import WorkerProcess, wait_for

    srv, check = server
    w = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{srv.port}"}).start()
    try:
        path = logins(tmp_path, mode=0o644)
        data = yaml.safe_load(w.config.read_text())
        data["smarthost"] = {"host": "127.0.0.1", "port": srv.port, "auth": "relay"}
        data["delivery"]["auth_file"] = str(path)
        w.config.write_text(yaml.safe_dump(data))
        bad = w.ask("RELOAD")
        assert bad["status"] == 500
        assert "delivery.auth_file" in bad["error"] and "mode 0644" in bad["error"]
        path.chmod(0o600)
        assert w.ask("RELOAD")["status"] == 200
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["a@example.org"])])
        rec = wait_for(lambda: w.final("j.bsmtp"), what="j.bsmtp final")
    finally:
        assert w.stop() == 0
    assert rec["transactions"][0]["recipients"][0]["status"] == "delivered"
    assert check.tried == [("PLAIN", "batch", PASSWORD)]


def test_auth_mechanisms_are_read_from_ehlo_in_both_forms() -> None:
    from spoolsmtp.model.reply import with_enhanced
    from spoolsmtp.smtp.protocol import Extensions

    ext = Extensions.parse(with_enhanced(250, ["mx.test", "AUTH LOGIN cram-md5", "AUTH=PLAIN"]))
    assert "AUTH" in ext and ext.auth == {"LOGIN", "CRAM-MD5", "PLAIN"}
