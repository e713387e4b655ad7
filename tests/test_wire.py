"""The supervisor's protocol with its delivery processes and its pure choices (app/wire.py):
batches that survive being torn by the socket, the child that gets the next envelope, each
child's part of a connection limit, and the sum of the children's counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from spoolsmtp.app import wire
from spoolsmtp.model.record import State
from spoolsmtp.model.stats import Stats


def test_batches_survive_any_split_of_the_bytes() -> None:
    batch = wire.Batch()
    assert batch.add("c", "job 1.bsmtp") is True  # the first item asks for a flush
    assert batch.add("c", "naïve\nname") is False  # a newline in a name cannot break a line
    first = batch.take()
    assert not batch
    batch.add("s", wire.summary_row("id1", "job", State.DEFERRED, 1.5, 9.0, {"a.example": 2}))
    batch.add("o", [3, "snap", []])
    data = first + batch.take()
    assert data.count(b"\n") == 2
    for cut in range(len(data) + 1):
        decoder = wire.Decoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert got == [
            {"c": ["job 1.bsmtp", "naïve\nname"]},
            {
                "s": [["id1", "job", "deferred", 1.5, 9.0, {"a.example": 2}]],
                "o": [[3, "snap", []]],
            },
        ]


def test_a_line_that_is_not_a_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a batch"):
        wire.Decoder().feed(b"[1, 2]\n")


def test_the_least_loaded_running_child_with_room_gets_the_work() -> None:
    assert wire.choose([3, 1, 2], room=10) == 1
    assert wire.choose([2, 2, 2], room=10) == 0  # a tie: the first
    assert wire.choose([None, 5, 0], room=10) == 2
    assert wire.choose([0, None], room=10) == 0
    assert wire.choose([None, None], room=10) is None  # all down: the work waits
    assert wire.choose([10, 11], room=10) is None  # all full: the work waits
    assert wire.choose([10, 9], room=10) == 1


def test_a_burst_is_spread_evenly() -> None:
    loads = [0, 0, 0]
    for _ in range(300):
        index = wire.choose(loads, room=1000)
        assert index is not None
        loads[index] += 1
    assert loads == [100, 100, 100]


@pytest.mark.parametrize(("limit", "children"), [(100, 2), (20, 3), (7, 7), (5, 2), (64, 64)])
def test_the_shares_of_a_limit_add_up_to_it_and_differ_by_one_at_most(
    limit: int, children: int
) -> None:
    parts = [wire.share(limit, children, k) for k in range(children)]
    assert sum(parts) == limit
    assert max(parts) - min(parts) <= 1
    assert min(parts) >= 1


def test_a_limit_smaller_than_the_processes_is_named() -> None:
    limits = {"delivery.max_connections": 100, "delivery.max_per_destination": 1}
    assert wire.too_small(limits, 2) == ["delivery.max_per_destination"]
    assert wire.too_small(limits, 1) == []


def test_counters_add_up_whatever_they_are() -> None:
    parts = [
        {"delivered": 3, "rate": 1.5, "by_code": {"250": 2, "451": 1}, "nested": {"a": {"b": 1}}},
        {"delivered": 4, "rate": 0.5, "by_code": {"250": 5, "550": 1}, "nested": {"a": {"b": 2}}},
        {"delivered": 1, "label": "x", "disk_full": True},
        {"label": "y", "disk_full": False},
    ]
    total = wire.add_up(parts)
    assert total == {
        "delivered": 8,
        "rate": 2.0,
        "by_code": {"250": 7, "451": 1, "550": 1},
        "nested": {"a": {"b": 3}},
        "label": "x",  # not a count: the first part's
        "disk_full": True,  # a flag: any
    }
    assert parts[0]["by_code"] == {"250": 2, "451": 1}  # the parts are not changed


@dataclass
class _MoreStats(Stats):
    """As another branch may grow Stats: new counts are summed without a change here."""

    by_reply: dict[str, int] = field(default_factory=dict)
    bytes_received: int = 0
    _private: int = 7


def test_every_public_count_of_stats_travels_and_nothing_else() -> None:
    stats = _MoreStats()
    stats.delivered = 2
    stats.by_reply["250"] = 2
    stats.bytes_received = 10
    stats.envelope_finished(0.1)
    got = wire.counters(stats)
    assert got["delivered"] == 2
    assert got["by_reply"] == {"250": 2}
    assert got["bytes_received"] == 10
    assert "started" not in got and "_private" not in got and "_latencies" not in got
    assert wire.add_up([got, got])["by_reply"] == {"250": 4}
