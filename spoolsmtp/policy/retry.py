"""Retry decisions, pure: when a deferred recipient is tried again, when it is given up, when
the sender is warned. ``now`` and the random draw are parameters, never read here.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from spoolsmtp.model.config import RetryConfig
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.model.units import format_duration

JITTER = 0.2


def backoff(attempts: int, cfg: RetryConfig, draw: float) -> float:
    """Seconds to wait after the ``attempts``-th failed try: the interval doubled per try,
    capped at ``max_interval``, spread by +-20% (``draw`` in [0, 1)) so that a burst of
    deferrals does not come back as a burst."""
    base: float = min(cfg.interval * 2.0 ** max(0, attempts - 1), cfg.max_interval)
    return min(base * (1 - JITTER + 2 * JITTER * draw), cfg.max_interval)


def next_attempt(
    received: datetime, attempts: int, now: datetime, cfg: RetryConfig, draw: float
) -> datetime:
    """When to try again; never later than the moment the recipient would expire."""
    due = now + timedelta(seconds=backoff(attempts, cfg, draw))
    return min(due, received + timedelta(seconds=cfg.max_age))


def expired(received: datetime, now: datetime, cfg: RetryConfig) -> bool:
    return (now - received).total_seconds() >= cfg.max_age


def expiry_reply(last: Reply | None, cfg: RetryConfig) -> Reply:
    """The reply a recipient fails with when it has been deferred for ``max_age``."""
    detail = f"; last reply: {last.render()[0]}" if last is not None else ""
    return make(554, "5.4.7", f"delivery time expired after {format_duration(cfg.max_age)}{detail}")


def warning_due(received: datetime, now: datetime, cfg: RetryConfig, warned: bool) -> bool:
    """A delay warning is sent once, after ``warning_age``, if that comes before expiry."""
    if warned or cfg.warning_age <= 0 or cfg.warning_age >= cfg.max_age:
        return False
    return (now - received).total_seconds() >= cfg.warning_age
