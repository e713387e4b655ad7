"""Servers that misbehave (raw asyncio servers), and what goes on the wire for the whole corpus."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model import config
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.spool import envfile
from tests.helpers import FAST_TIMEOUTS, draft, make_config, write_envelope
from tests.smtpservers import RawServer, SmtpServer, read_line, standard_dialogue

CORPUS = Path(__file__).parent / "corpus"
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


def run_against(
    tmp_path: Path, script: Script, **delivery: Any
) -> tuple[RecipientResult, list[str]]:
    srv = RawServer(script)
    trace: list[str] = []
    try:
        cfg = make_config(routes={"example.org": f"127.0.0.1:{srv.port}"}, delivery=delivery)
        path = tmp_path / "e.bsmtp"
        env = write_envelope(path, [draft("o@example.com", ["a@example.org"])])

        async def go() -> RecipientResult:
            d = Deliverer(cfg, MxResolver(cfg.dns), trace=trace.append)
            try:
                (res,) = await d.deliver(path, env.transactions[0], "E", datetime.now(UTC))
            finally:
                await d.close_all()
            return res

        return asyncio.run(go()), trace
    finally:
        srv.stop()


def short(**t: str) -> dict[str, Any]:
    base = {**FAST_TIMEOUTS, **t}
    return {"timeouts": base}


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    res, _ = run_against(tmp_path, silent, **short(greeting="300ms"))
    assert res.status is Status.DEFERRED
    assert "timeout" in res.reply.text


def test_a_dripping_server_is_bounded_by_the_whole_reply_deadline(tmp_path: Path) -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in b"220 " + b"x" * 200 + b"\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)

    res, _ = run_against(tmp_path, drip, **short(greeting="500ms"))
    assert res.status is Status.DEFERRED
    assert "timeout" in res.reply.text


@pytest.mark.parametrize(
    "greeting",
    [b"hello there, I am not SMTP\r\n", b"220-" + b"y" * 5000 + b"\r\n"],
    ids=["garbage", "over-long"],
)
def test_garbage_and_over_long_replies_defer(tmp_path: Path, greeting: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        await reader.read()

    res, trace = run_against(tmp_path, bad)
    assert res.status is Status.DEFERRED
    assert res.reply.enhanced == "4.5.0"
    assert any("protocol error" in t for t in trace)


def test_disconnect_right_after_the_dot_is_deferred_as_possible_duplicate(tmp_path: Path) -> None:
    async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test\r\n")
        while True:
            line = await read_line(reader)
            if line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                return
            writer.write(b"250 ok\r\n")
            await writer.drain()

    res, _ = run_against(tmp_path, hangup)
    assert res.status is Status.DEFERRED
    assert res.after_dot
    assert "after the final dot" in res.reply.text


def test_a_refused_greeting_is_tried_as_a_failure_of_that_host(tmp_path: Path) -> None:
    async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.3.2 no service for you\r\n")
        await writer.drain()
        await reader.read()

    res, _ = run_against(tmp_path, busy)
    assert res.status is Status.FAILED
    assert res.reply.code == 554


def test_ehlo_refused_falls_back_to_helo(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def old(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test\r\n")
        seen.append(await read_line(reader))
        writer.write(b"502 5.5.1 what is EHLO\r\n")
        await writer.drain()
        await standard_dialogue_after_greeting(reader, writer, seen)

    res, _ = run_against(tmp_path, old)
    assert res.status is Status.DELIVERED
    assert seen[0].startswith(b"EHLO spoolsmtp.test")
    assert seen[1].startswith(b"HELO spoolsmtp.test")


def test_bytes_injected_after_the_starttls_220_are_discarded(tmp_path: Path) -> None:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    after_tls: list[bytes] = []

    async def injector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 inject.test\r\n")
        await read_line(reader)
        writer.write(b"250-inject.test\r\n250 STARTTLS\r\n")
        await writer.drain()
        assert (await read_line(reader)).startswith(b"STARTTLS")
        writer.write(b"220 go ahead\r\n250-injected\r\n250 PIPELINING\r\n")
        await writer.drain()
        await writer.start_tls(ctx)
        await standard_dialogue_after_greeting(reader, writer, after_tls)

    res, trace = run_against(tmp_path, injector)
    assert res.status is Status.DELIVERED
    assert any("discarded" in t for t in trace)
    assert after_tls[0].startswith(b"EHLO ")
    assert any(line.startswith(b"MAIL FROM") for line in after_tls)


async def standard_dialogue_after_greeting(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, received: list[bytes]
) -> None:
    """``standard_dialogue`` without its 220 (for after STARTTLS)."""

    class _NoGreeting:
        def __init__(self, w: asyncio.StreamWriter) -> None:
            self.w = w
            self.first = True

        def write(self, data: bytes) -> None:
            if self.first and data.startswith(b"220 "):
                self.first = False
                return
            self.w.write(data)

        async def drain(self) -> None:
            await self.w.drain()

    await standard_dialogue(reader, _NoGreeting(writer), received)  # type: ignore[arg-type]


# -- the wire ------------------------------------------------------------------------------


def test_every_corpus_message_reaches_the_server_intact(tmp_path: Path) -> None:
    """For every corpus envelope with a transaction, what the server receives holds CRLF.CRLF
    once per message at its end, no bare CR or LF, no NUL, and the stored message is the
    envelope's message plus our Received header."""
    corpus_cfg = config.load(CORPUS / "spoolsmtp.yaml")
    srv = SmtpServer()
    try:
        cfg = make_config(smarthost=f"127.0.0.1:{srv.port}", delivery={"reuse_connections": False})
        sent = 0
        for path in sorted(CORPUS.glob("*.bsmtp")):
            try:
                env = envfile.read(path, corpus_cfg.limits, "mx.test")
            except Exception:
                continue
            for tx in env.transactions:
                before = len(srv.raw)

                async def go(tx: Any = tx, path: Path = path) -> list[RecipientResult]:
                    d = Deliverer(cfg, MxResolver(cfg.dns))
                    try:
                        return await d.deliver(path, tx, "W", datetime.now(UTC))
                    finally:
                        await d.close_all()

                results = asyncio.run(go())
                assert all(r.status is Status.DELIVERED for r in results), (path, results)
                wire = b"".join(srv.raw[before:])
                assert wire.count(b"\r\n.\r\n") == 1, path
                data_at = wire.index(b"DATA\r\n")
                assert wire.index(b"\r\n.\r\n") > data_at
                assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n"), path
                assert b"\x00" not in wire
                stored = srv.messages[-1].content
                text = envfile.message_bytes(path, tx.message)
                assert stored.endswith(text), path
                assert stored[: len(stored) - len(text)].startswith(b"Received: ")
                assert stored[: len(stored) - len(text)].count(b"Received:") == 1
                sent += 1
        assert sent >= 25
    finally:
        srv.stop()


def run_deliver(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoolsmtp", "deliver", "--config", "conf.yaml", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_deliver_command_prints_outcomes_and_dialogue(tmp_path: Path) -> None:
    srv = SmtpServer()
    try:
        (tmp_path / "conf.yaml").write_text(
            f"hostname: spoolsmtp.test\nroutes:\n  example.org: 127.0.0.1:{srv.port}\n"
        )
        (tmp_path / "e.bsmtp").write_text(
            "HELO h\nMAIL FROM:<o@example.com>\nRCPT TO:<a@example.org>\nDATA\nhi\n.\nQUIT\n"
        )
        result = run_deliver(tmp_path, "-v", "e.bsmtp")
    finally:
        srv.stop()
    assert result.returncode == 0, result.stderr
    assert "a@example.org: delivered: 250 2.0.0 queued" in result.stdout
    assert "> MAIL FROM:<o@example.com>" in result.stderr
    assert "< 250 2.0.0 queued" in result.stderr


@pytest.mark.parametrize(("reply", "code"), [("550 5.1.1 no", 67), ("450 4.2.1 later", 75)])
def test_deliver_command_exit_codes(tmp_path: Path, reply: str, code: int) -> None:
    from tests.smtpservers import Script

    srv = SmtpServer(Script(rcpt={"a@example.org": reply}))
    try:
        (tmp_path / "conf.yaml").write_text(f"routes:\n  example.org: 127.0.0.1:{srv.port}\n")
        (tmp_path / "e.bsmtp").write_text(
            "HELO h\nMAIL FROM:<o@example.com>\nRCPT TO:<a@example.org>\nDATA\nhi\n.\nQUIT\n"
        )
        result = run_deliver(tmp_path, "e.bsmtp")
    finally:
        srv.stop()
    assert result.returncode == code, result.stdout + result.stderr


def test_every_reply_is_waited_for_under_its_own_configured_timeout() -> None:
    """Each command's reply is bounded by the timeout RFC 5321 gives it, as configured."""
    from spoolsmtp.smtp.protocol import Verb
    from spoolsmtp.smtp.protocol import timeout_for as _timeout_for

    t = config.Timeouts(greeting=1, ehlo=2, starttls=3, mail=4, rcpt=5, data=6, data_end=7, quit=8)
    expected = {
        Verb.GREETING: 1,
        Verb.EHLO: 2,
        Verb.HELO: 2,
        Verb.STARTTLS: 3,
        Verb.AUTH: 2,  # the EHLO timeout (RFC 4954 gives none)
        Verb.MAIL: 4,
        Verb.RSET: 4,
        Verb.NOOP: 4,
        Verb.RCPT: 5,
        Verb.DATA: 6,
        Verb.END_OF_DATA: 7,
        Verb.QUIT: 8,
    }
    assert {verb: _timeout_for(verb, t) for verb in Verb} == expected
