"""The control channel against a small implementation of its port, over the real socket, in
this process: what an answer's status means does not depend on the worker behind it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.control.port import COUNTED, NoSuchEnvelope, Reloaded, Traffic
from spoolsmtp.control.server import ControlServer
from spoolsmtp.control.tracer import Tracer
from spoolsmtp.model.config import Config
from spoolsmtp.model.record import State
from spoolsmtp.model.stats import Stats
from spoolsmtp.spool.nodes import Adopted, NoSuchNode
from tests.test_control import sockdir  # noqa: F401 - fixture

ID = "20260101-000000-000000-abcdef"
OTHER = "20260101-000000-000000-fedcba"


@dataclass
class Queued:
    id: str
    source: str
    state: State
    received: float
    next_attempt: float | None = None
    destinations: dict[str, int] = field(default_factory=dict)


@dataclass
class Disk:
    since: float | None = None
    reason: str = ""

    @property
    def full(self) -> bool:
        return self.since is not None


class Port:
    """Queued envelope ``ID`` for example.org; ``broken`` names the one method that has a bug
    (it raises KeyError, as a dictionary look-up gone wrong would)."""

    def __init__(self, broken: str = "") -> None:
        self.broken = broken
        self.cfg = Config()
        self.index = {ID: Queued(ID, "j.bsmtp", State.DEFERRED, time.time(), None, {"ex.org": 1})}
        self.suspended = False
        self.disk = Disk()
        self.stats = Stats()
        self.tracer = Tracer()
        self.counting = asyncio.Event()
        self.counted = asyncio.Event()
        self.counted.set()

    def _bug(self, name: str) -> None:
        if self.broken == name:
            raise KeyError("a bug")

    def traffic(self) -> Traffic:
        return Traffic()

    async def folder_counts(self) -> Mapping[str, int]:
        self.counting.set()
        await self.counted.wait()
        return dict.fromkeys(COUNTED, 0)

    async def result(self, envelope_id: str) -> dict[str, Any]:
        self._bug("result")
        raise NoSuchEnvelope(envelope_id)

    def destination_key(self, domain: str) -> str:
        return domain

    def dead_destinations(self) -> Mapping[str, float]:
        self._bug("dead_destinations")
        return {}

    async def hold(self, envelope_id: str) -> str:
        self._bug("hold")
        return f"{envelope_id} held"

    async def release(self, envelope_id: str) -> str:
        self._bug("release")
        return f"{envelope_id} released"

    def flush(self, envelope_id: str | None = None, destination: str | None = None) -> int:
        self._bug("flush")
        return 1

    def expire(self, domain: str) -> bool:
        self._bug("expire")
        return False

    def suspend(self) -> None:
        self.suspended = True

    def resume(self) -> None:
        self.suspended = False

    def reload(self) -> Reloaded:
        self._bug("reload")
        return Reloaded(self.cfg.source)

    def stop(self) -> None:
        pass

    async def adopt(self, node: str) -> Adopted:
        raise NoSuchNode(node)


async def _ask(sock: Path, lines: list[str]) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    answers = []
    try:
        for line in lines:
            writer.write(f"JSON {line}\n".encode())
            await writer.drain()
            answers.append(json.loads(await reader.readline()))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


def _serve(port: Port, sock: Path, lines: list[str]) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        server = ControlServer(port, sock)
        await server.start()
        try:
            return await _ask(sock, lines)
        finally:
            await server.close()

    return asyncio.run(run())


@pytest.fixture
def sock(sockdir: Path) -> Iterator[Path]:  # noqa: F811
    yield sockdir / "control.sock"


@pytest.mark.parametrize(
    ("broken", "line"),
    [
        ("hold", f"HOLD {ID}"),
        ("release", f"RELEASE {ID}"),
        ("flush", f"FLUSH {ID}"),
        ("dead_destinations", "QUERY"),
    ],
)
def test_a_bug_inside_a_command_is_a_500_not_no_such_envelope(
    sock: Path, broken: str, line: str
) -> None:
    (answer,) = _serve(Port(broken), sock, [line])
    assert answer["status"] == 500, answer
    assert answer["error"].startswith(f"{line.split(maxsplit=1)[0]} failed: KeyError")


def test_an_envelope_the_worker_does_not_know_is_a_404(sock: Path) -> None:
    lines = [f"HOLD {OTHER}", f"RELEASE {OTHER}", f"FLUSH {OTHER}", f"HOLD {ID}"]
    answers = _serve(Port(), sock, lines)
    assert [a["status"] for a in answers] == [404, 404, 404, 200]
    assert answers[0]["error"] == f"no queued envelope {OTHER}"


def test_query_of_an_envelope_without_a_record_is_a_404_and_a_broken_read_a_500(
    sock: Path,
) -> None:
    (missing,) = _serve(Port(), sock, [f"QUERY {ID}"])
    assert missing["status"] == 404 and missing["error"] == f"no envelope {ID}"
    (broken,) = _serve(Port("result"), sock, [f"QUERY {ID}"])
    assert broken["status"] == 500


def test_the_loop_answers_others_while_query_waits_for_its_counts(sock: Path) -> None:
    """QUERY's folder counts come from the port without holding the event loop: while they
    are being counted, another client is answered."""
    port = Port()
    port.counted.clear()

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        server = ControlServer(port, sock)
        await server.start()
        try:
            query = asyncio.ensure_future(_ask(sock, ["QUERY"]))
            await port.counting.wait()
            (other,) = await _ask(sock, ["STATS"])
            assert not query.done()
            port.counted.set()
            (answer,) = await query
            return other, answer
        finally:
            await server.close()

    other, answer = asyncio.run(run())
    assert other["status"] == 200 and answer["status"] == 200
    assert answer["result"]["states"]["deferred"] == 1
