"""The per-destination concurrency limits: kept only while a destination is in use.

Before, the deliverer kept a semaphore for every destination it had ever seen, so a long-running
worker's table grew with every recipient domain of every envelope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.limits import DestinationLimits
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.outcome import Status
from spoolsmtp.spool import envfile
from tests.dnsserver import Zone, serve
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import SmtpServer

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
DOMAINS = 30


@pytest.fixture
def mx_zone() -> Iterator[int]:
    """Thirty domains whose MX is one loopback host; yields the DNS server's port."""
    zone = Zone()
    zone.add("mx.test", "A", "127.0.0.1")
    for i in range(DOMAINS):
        zone.add(f"d{i}.test", "MX", "10 mx.test.")
    with serve(zone) as port:
        yield port


def test_the_deliverer_keeps_no_limit_for_a_destination_no_longer_in_use(
    tmp_path: Path, mx_zone: int
) -> None:
    server = SmtpServer()
    try:
        cfg = make_config(
            dns={"nameservers": ["127.0.0.1"], "port": mx_zone, "allow_loopback": True},
            delivery={"port": server.port},
        )
        path = tmp_path / "env"
        rcpts = [f"user@d{i}.test" for i in range(DOMAINS)]
        write_envelope(path, [draft("from@example.com", rcpts)], cfg)
        tx = envfile.read(path, cfg.limits, cfg.helo_name).transactions[0]

        async def run() -> tuple[list[Status], int]:
            resolver = MxResolver(cfg.dns, cfg.delivery.max_addresses, cfg.delivery.port)
            deliverer = Deliverer(cfg, resolver)
            try:
                results = await deliverer.deliver(path, tx, "ENV1", NOW)
            finally:
                await deliverer.close_all()
            return [r.status for r in results], len(deliverer._per_destination)

        statuses, kept = asyncio.run(run())
    finally:
        server.stop()
    assert statuses == [Status.DELIVERED] * DOMAINS
    assert len(server.messages) == DOMAINS
    assert kept == 0


def test_a_destination_never_has_more_than_its_limit_inside() -> None:
    """Holders leave while others wait: the waiters still share the one semaphore."""

    async def run() -> tuple[int, int, list[int]]:
        limits = DestinationLimits(1)
        inside = 0
        most = 0
        sizes: list[int] = []
        go = asyncio.Event()

        async def use(key: str) -> None:
            nonlocal inside, most
            async with limits.hold(key):
                inside += 1
                most = max(most, inside)
                await go.wait()
                sizes.append(len(limits))
                inside -= 1

        tasks = [asyncio.create_task(use("a")) for _ in range(3)]
        other = asyncio.create_task(use("b"))
        for _ in range(100):  # until "a" has one inside and two waiting, "b" one inside
            if inside >= 2:
                break
            await asyncio.sleep(0)
        held = len(limits)
        go.set()
        await asyncio.gather(*tasks, other)
        return most, held, sizes

    most, held, sizes = asyncio.run(run())
    assert most == 2  # one "a" and one "b" at a time, never two "a"
    assert held == 2
    assert sizes[-1] == 1  # the last holder still has its entry while inside


def test_limits_of_many_destinations_do_not_accumulate() -> None:
    async def run() -> int:
        limits = DestinationLimits(2)
        for i in range(1000):
            async with limits.hold(f"d{i}.test"):
                assert len(limits) == 1
        return len(limits)

    assert asyncio.run(run()) == 0


def test_a_holder_that_fails_still_leaves() -> None:
    async def run() -> int:
        limits = DestinationLimits(1)
        with pytest.raises(RuntimeError):
            async with limits.hold("a"):
                raise RuntimeError("delivery failed")
        async with limits.hold("a"):  # not left held: this would wait forever
            pass
        return len(limits)

    assert asyncio.run(run()) == 0


def test_a_waiter_cancelled_before_its_turn_leaves_no_place_taken() -> None:
    async def run() -> int:
        limits = DestinationLimits(1)
        async with limits.hold("a"):
            waiter = asyncio.create_task(limits.hold("a").__aenter__())
            await asyncio.sleep(0)  # one step: the waiter now waits for the place
            assert not waiter.done()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with limits.hold("a"):  # the place is free, not given to the cancelled one
            pass
        return len(limits)

    assert asyncio.run(run()) == 0
