"""Retry decisions (``spoolsmtp.policy.retry``), pure: ``now`` and the random draw are given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from spoolsmtp.model.config import RetryConfig
from spoolsmtp.model.reply import make
from spoolsmtp.policy.retry import JITTER, backoff, expired, expiry_reply, next_attempt, warning_due

RECEIVED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
CFG = RetryConfig(interval=600, max_interval=4 * 3600, max_age=86400, warning_age=4 * 3600)
MIDDLE = 0.5  # the draw that spreads by nothing


def later(seconds: float) -> datetime:
    return RECEIVED + timedelta(seconds=seconds)


def test_the_wait_doubles_per_attempt_up_to_the_cap() -> None:
    waits = [backoff(n, CFG, MIDDLE) for n in range(1, 9)]
    assert waits == [600, 1200, 2400, 4800, 9600, 14400, 14400, 14400]


def test_attempt_zero_waits_the_interval() -> None:
    assert backoff(0, CFG, MIDDLE) == 600


@pytest.mark.parametrize(("draw", "factor"), [(0.0, 1 - JITTER), (0.25, 0.9), (0.75, 1.1)])
def test_the_wait_is_spread_by_the_draw(draw: float, factor: float) -> None:
    assert backoff(2, CFG, draw) == pytest.approx(1200 * factor)


def test_a_burst_of_deferrals_comes_back_spread_over_plus_minus_20_percent() -> None:
    draws = [i / 100 for i in range(100)]
    waits = [backoff(1, CFG, d) for d in draws]
    assert min(waits) == pytest.approx(480)
    assert max(waits) == pytest.approx(600 * 1.2, rel=0.01)
    assert len(set(waits)) == 100


def test_the_spread_never_goes_past_the_cap() -> None:
    assert backoff(20, CFG, 0.999) == CFG.max_interval
    assert backoff(20, CFG, 0.0) == pytest.approx(CFG.max_interval * (1 - JITTER))


def test_the_next_attempt_is_the_wait_from_now() -> None:
    now = later(3600)
    assert next_attempt(RECEIVED, 3, now, CFG, MIDDLE) == now + timedelta(seconds=2400)


def test_the_next_attempt_is_never_after_the_recipient_would_expire() -> None:
    now = later(86400 - 60)
    assert next_attempt(RECEIVED, 10, now, CFG, MIDDLE) == later(86400)


@pytest.mark.parametrize(
    ("age", "gone"), [(0, False), (86399.9, False), (86400, True), (9e5, True)]
)
def test_expired_at_max_age(age: float, gone: bool) -> None:
    assert expired(RECEIVED, later(age), CFG) is gone


def test_the_expiry_reply_gives_the_age_and_the_last_reply() -> None:
    last = make(451, "4.7.1", "greylisted")
    reply = expiry_reply(last, CFG)
    assert (reply.code, reply.enhanced) == (554, "5.4.7")
    assert reply.text == "delivery time expired after 1d; last reply: 451 4.7.1 greylisted"


def test_the_expiry_reply_without_a_last_reply() -> None:
    reply = expiry_reply(None, RetryConfig(max_age=5400))
    assert reply.text == "delivery time expired after 90m"


@pytest.mark.parametrize(
    ("age", "warned", "due"),
    [
        (4 * 3600 - 1, False, False),
        (4 * 3600, False, True),
        (20 * 3600, False, True),
        (20 * 3600, True, False),  # once only
    ],
)
def test_one_delay_warning_after_warning_age(age: float, warned: bool, due: bool) -> None:
    assert warning_due(RECEIVED, later(age), CFG, warned) is due


@pytest.mark.parametrize("warning_age", [0, 86400, 90000])
def test_no_delay_warning_when_off_or_not_before_expiry(warning_age: float) -> None:
    cfg = RetryConfig(max_age=86400, warning_age=warning_age)
    assert not warning_due(RECEIVED, later(86399), cfg, warned=False)
