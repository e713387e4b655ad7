"""A pooled connection the server dropped while it sat idle: found stale, opened again."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.outcome import Status
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import RawServer, read_line, standard_dialogue


def test_a_reused_connection_closed_before_any_reply_is_opened_again(tmp_path: Path) -> None:
    connections: list[list[bytes]] = []

    async def drops_the_first_after_one_message(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        received: list[bytes] = []
        connections.append(received)
        if len(connections) > 1:
            await standard_dialogue(reader, writer, received)
            return
        writer.write(b"220 raw.test ready\r\n")
        mails = 0
        while True:
            line = await read_line(reader)
            received.append(line)
            if line.startswith(b"MAIL"):
                mails += 1
                if mails == 2:
                    return  # gone, as a server closing an idle connection
            if line.startswith(b"DATA"):
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                received.append(await reader.readuntil(b"\r\n.\r\n"))
            writer.write(b"250 ok\r\n")
            await writer.drain()

    srv = RawServer(drops_the_first_after_one_message)
    try:
        cfg = make_config(routes={"example.org": f"127.0.0.1:{srv.port}"})
        path = tmp_path / "e.bsmtp"
        env = write_envelope(path, [draft("o@example.com", ["a@example.org"])])

        async def go() -> list[Status]:
            d = Deliverer(cfg, MxResolver(cfg.dns))
            statuses = []
            try:
                for _ in range(2):
                    (res,) = await d.deliver(path, env.transactions[0], "E", datetime.now(UTC))
                    statuses.append(res.status)
            finally:
                await d.close_all()
            return statuses

        statuses = asyncio.run(go())
    finally:
        srv.stop()
    assert statuses == [Status.DELIVERED, Status.DELIVERED]
    assert len(connections) == 2
    # the first connection took one message, the second the other: none lost, none twice
    assert [sum(b.endswith(b"\r\n.\r\n") for b in c) for c in connections] == [1, 1]
