"""METRICS: what STATS and QUERY say, as Prometheus metrics (exposition.py writes the format).

``families(stats, traffic, gauges)`` is pure: a supervisor that sums its children's ``Stats``
(``model.stats.added``) and their gauges renders the sum with it. ``exposition(port)`` reads
one worker's port; ``command`` answers ``METRICS`` on the control socket (open to anyone, as
STATS: counts only, no address, no envelope id), and metricshttp.py serves the same text.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from spoolsmtp.control import commands
from spoolsmtp.control import exposition as ex
from spoolsmtp.control.commands import BAD, OK, Answer
from spoolsmtp.control.port import COUNTED, ControlPort, Traffic
from spoolsmtp.model.record import State
from spoolsmtp.model.stats import Stats

USUAL = (("sent", "2"), ("deferred", "4"), ("bounced", "5"), ("expired", "5"))
QUEUED = {State.ACTIVE: "active", State.DEFERRED: "deferred", State.HELD: "held"}  # as QUERY


@dataclass(frozen=True)
class Gauges:
    """What is true now: files per spool state, the oldest envelope's age per queue state,
    dead destinations, whether the disk is full and taking is suspended; and the trace lines
    dropped so far (the tracer's counter, not in ``Stats``)."""

    queue: Mapping[str, int] = field(default_factory=dict)
    oldest: Mapping[str, float] = field(default_factory=dict)
    dead_destinations: int = 0
    disk_full: bool = False
    suspended: bool = False
    trace_dropped: int = 0


async def gauges(port: ControlPort) -> Gauges:
    """The port's gauges: the queue states from its index, the other folders counted on disk
    (off the event loop)."""
    now = time.time()
    queue = dict.fromkeys(("incoming", *QUEUED.values(), *COUNTED[1:]), 0)
    oldest = dict.fromkeys(QUEUED.values(), 0.0)
    for summary in list(port.index.values()):
        state = QUEUED.get(summary.state)
        if state is not None:
            queue[state] += 1
            oldest[state] = max(oldest[state], now - summary.received)
    counted = await port.folder_counts()
    for name in COUNTED:
        queue[name] = counted[name]
    dead = sum(1 for until in port.dead_destinations().values() if until > now)
    return Gauges(queue, oldest, dead, port.disk.full, port.suspended, port.tracer.dropped)


def families(stats: Stats, traffic: Traffic, now: Gauges) -> list[ex.Family]:
    """Every metric, pure."""
    c = ex.counter
    # the usual outcomes are there from the start (0), so that rate() sees their first one
    counts = {**dict.fromkeys(USUAL, 0), **stats.recipients}
    recipients: dict[ex.Labels, float] = {
        (("status", status), ("dsn_class", dsn_class)): float(n)
        for (status, dsn_class), n in counts.items()
    }
    hist = stats.latency_histogram
    return [
        c("spoolsmtp_envelopes_taken_total", "Files taken from incoming/.", stats.files_taken),
        c(
            "spoolsmtp_envelopes_rejected_total",
            "Files taken that were not envelopes (moved to rejected/).",
            stats.files_rejected,
        ),
        c(
            "spoolsmtp_files_refused_total",
            "Names in incoming/ never taken (not a regular file, bad name).",
            stats.files_refused,
        ),
        ex.labelled(
            "counter",
            "spoolsmtp_recipients_total",
            "Recipient outcomes of delivery attempts, by mail log status and DSN class.",
            recipients,
        ),
        ex.histogram(
            "spoolsmtp_delivery_latency_seconds",
            "Seconds from arrival to a recipient's final outcome (sent, bounced, expired).",
            hist.cumulative(),
            hist.total,
        ),
        c("spoolsmtp_reports_total", "Reports written to senders.", stats.reports),
        c(
            "spoolsmtp_deadletters_total",
            "Reports about null-sender mail written to deadletter/.",
            stats.deadletters,
        ),
        c(
            "spoolsmtp_possible_duplicates_total",
            "Recipients whose message may have been delivered twice (RFC 5321 section 6.1).",
            stats.possible_duplicates,
        ),
        c("spoolsmtp_quarantined_total", "Envelopes quarantined in rejected/.", stats.quarantined),
        c(
            "spoolsmtp_disk_full_pauses_total",
            "Times taking and delivering paused because the spool's disk was full.",
            stats.disk_full_pauses,
        ),
        c(
            "spoolsmtp_connections_opened_total",
            "SMTP connections opened.",
            traffic.connections_opened,
        ),
        c(
            "spoolsmtp_connections_reused_total",
            "SMTP transactions sent on a connection kept open.",
            traffic.connections_reused,
        ),
        c(
            "spoolsmtp_tls_sessions_total",
            "SMTP connections that started TLS.",
            traffic.tls_sessions,
        ),
        c("spoolsmtp_sent_bytes_total", "Bytes of message text sent.", traffic.bytes_sent),
        c(
            "spoolsmtp_dns_lookups_total",
            "DNS look-ups: destinations (MX or route host), DANE TLSA and MTA-STS TXT records.",
            traffic.dns_lookups,
        ),
        c(
            "spoolsmtp_dns_cache_hits_total",
            "Look-ups answered without a query of their own (the cache, or one under way).",
            traffic.dns_cache_hits,
        ),
        c("spoolsmtp_dns_queries_total", "DNS queries sent.", traffic.dns_queries),
        c(
            "spoolsmtp_trace_dropped_total",
            "Trace lines dropped because a follower could not keep up.",
            now.trace_dropped,
        ),
        ex.labelled(
            "gauge",
            "spoolsmtp_queue_envelopes",
            "Envelopes (files) in each state of the spool.",
            {(("state", k),): float(v) for k, v in now.queue.items()},
        ),
        ex.labelled(
            "gauge",
            "spoolsmtp_queue_oldest_age_seconds",
            "Age of the oldest envelope in each queue state (0: none).",
            {(("state", k),): v for k, v in now.oldest.items()},
        ),
        ex.gauge(
            "spoolsmtp_dead_destinations",
            "Destinations none of whose hosts answered, not tried until their mark ends.",
            now.dead_destinations,
        ),
        ex.gauge("spoolsmtp_disk_full", "1 while the spool's disk is full.", now.disk_full),
        ex.gauge("spoolsmtp_suspended", "1 while taking and retries are suspended.", now.suspended),
        ex.gauge(
            "spoolsmtp_start_time_seconds",
            "When the worker started, in seconds since the epoch.",
            stats.started,
        ),
    ]


async def exposition(port: ControlPort) -> str:
    """One worker's metrics in the text format."""
    return ex.render(families(port.stats, port.traffic(), await gauges(port)))


async def command(port: ControlPort, command: str, args: list[str]) -> Answer:
    """``METRICS``: the exposition as the answer's text (``ctl METRICS`` prints it whole, for
    node_exporter's textfile collector) and as ``exposition`` in its JSON form."""
    if args:
        return Answer(BAD, command, text=["METRICS takes no argument"])
    text = await exposition(port)
    return Answer(OK, command, {"exposition": text}, text.splitlines())


# the command is this module's; commands.py knows nothing of it (server.py imports this module)
commands.register(
    "METRICS",
    command,
    [("METRICS", "anyone", "the same as Prometheus metrics (text format 0.0.4)")],
)
