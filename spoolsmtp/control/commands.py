"""Operator commands: parse a request line, run it against the control port, answer as data
and text.

Every answer is data (``Answer.data``, the JSON form) with a human rendering (``Answer.text``).
Read commands (HELP, QUERY, STATS) only look at snapshots the port keeps in memory and at what
it reads off the event loop, so they never wait on delivery, DNS or a remote server. Commands
know the worker only as a ``ControlPort`` (port.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from spoolsmtp.bsmtp.address import check_domain
from spoolsmtp.control.port import COUNTED, ControlPort, NoSuchEnvelope
from spoolsmtp.control.tracer import Kind
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.record import State
from spoolsmtp.spool.folders import is_id

OK, BAD, REFUSED, NOT_FOUND, CONFLICT, FAILED = 200, 400, 403, 404, 409, 500
PUBLIC = frozenset({"HELP", "QUERY", "QUEUE", "STATS", "METRICS"})
HELP = [
    ("HELP", "anyone", "this list"),
    ("QUERY | QUEUE", "anyone", "counts per state, oldest age, destinations, next retry"),
    ("QUERY ID", "anyone", "one envelope's state and recipients"),
    ("QUERY DEST domain", "authorised", "the queue of one destination"),
    ("STATS", "anyone", "counters and gauges since start"),
    ("METRICS", "anyone", "the same as Prometheus metrics (text format 0.0.4)"),
    ("TRACE RESOLVER|SESSION|SPOOL|ALL", "authorised", "trace to the log (ctl --follow: here)"),
    ("NOTRACE RESOLVER|SESSION|SPOOL|ALL", "authorised", "stop tracing"),
    ("DEBUG | NODEBUG", "authorised", "TRACE SESSION | NOTRACE SESSION, as on VM"),
    ("HOLD ID|ALL", "authorised", "keep a queued envelope from being retried"),
    ("RELEASE ID|ALL", "authorised", "undo HOLD; retry at once"),
    ("FLUSH [ID | DEST domain]", "authorised", "retry now (all, one, or one destination)"),
    ("EXPIRE domain", "authorised", "forget cached DNS answers for a domain"),
    ("SUSPEND | RESUME", "authorised", "stop / restart taking files and retrying"),
    ("RELOAD", "authorised", "read the configuration file again"),
    ("SHUTDOWN", "authorised", "finish what is in flight and stop"),
    ("ADOPT node|-", "authorised", "take over a dead node's work (-: the default node)"),
]


@dataclass(frozen=True)
class Answer:
    """The answer to one command."""

    status: int
    command: str
    data: dict[str, Any] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return self.text[0] if self.text else ""

    def as_json(self) -> str:
        body: dict[str, Any] = {"status": self.status, "command": self.command}
        if self.status == OK:
            body["result"] = self.data
        else:
            body["error"] = self.summary
        return json.dumps(body, ensure_ascii=False)


def parse(line: str) -> tuple[str, list[str]]:
    """The verb (upper case, aliases resolved) and its arguments."""
    words = line.split()
    if not words:
        return "", []
    verb, args = words[0].upper(), words[1:]
    if verb == "QUEUE":
        verb = "QUERY"
    elif verb == "DEBUG":
        verb, args = "TRACE", ["SESSION"]
    elif verb == "NODEBUG":
        verb, args = "NOTRACE", ["SESSION"]
    return verb, args


def needs_authority(verb: str, args: list[str] | None = None) -> bool:
    """Only root and the authorised may run it? Not an unknown verb (its own 400); QUERY DEST,
    which lists other people's envelopes, yes (QUERY ID needs an id only its submitter knows)."""
    dest = verb == "QUERY" and (args or [""])[0].upper() == "DEST"
    return dest or (verb in _HANDLERS and verb not in PUBLIC)


def _bad(command: str, text: str) -> Answer:
    return Answer(BAD, command, text=[text])


def _bad_id(command: str, word: str) -> Answer | None:
    """A 400 unless ``word`` is an envelope id (checked here, where ids enter)."""
    if is_id(word):
        return None
    return _bad(command, f"not an envelope id: {_shown(word)}")


def _bad_domain(command: str, word: str) -> Answer | None:
    """A 400 unless ``word`` is a domain name or an address literal."""
    if len(word) <= 255 and check_domain(word, "destination", "5.1.2") is None:
        return None
    return _bad(command, f"not a domain: {_shown(word)}")


def _shown(word: str) -> str:
    """A peer's word, bounded and with control characters escaped, for an answer."""
    return repr(word[:64] + ("..." if len(word) > 64 else ""))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _queued(port: ControlPort, envelope_id: str) -> str:
    """``envelope_id`` if the worker queues it, else ``NoSuchEnvelope``."""
    if envelope_id not in port.index:
        raise NoSuchEnvelope(envelope_id, "queued envelope")
    return envelope_id


async def execute(port: ControlPort, verb: str, args: list[str]) -> Answer:
    """Run one parsed command. An envelope the worker does not know is a 404 and a bad
    configuration for RELOAD a 500; any other exception is the caller's (a bug: a 500)."""
    command = " ".join([verb, *args])
    handler = _HANDLERS.get(verb)
    if handler is None:
        return _bad(command, f"unknown command {verb!r}; HELP lists the commands")
    try:
        return await handler(port, command, args)
    except NoSuchEnvelope as exc:
        return Answer(NOT_FOUND, command, text=[str(exc)])
    except ConfigError as exc:
        return Answer(FAILED, command, text=[f"config error, nothing changed: {exc}"])


async def _help(port: ControlPort, command: str, args: list[str]) -> Answer:
    width = max(len(c) for c, _, _ in HELP)
    text = [f"{c:{width}}  {who:10}  {what}" for c, who, what in HELP]
    data = {"commands": [{"command": c, "who": who, "what": what} for c, who, what in HELP]}
    return Answer(OK, command, data, ["commands:", *text])


async def _query(port: ControlPort, command: str, args: list[str]) -> Answer:
    if not args:
        return await _overview(port, command)
    if args[0].upper() == "DEST":
        if len(args) != 2:
            return _bad(command, "usage: QUERY DEST domain")
        return _bad_domain(command, args[1]) or _destination(port, command, args[1])
    if len(args) != 1:
        return _bad(command, "usage: QUERY [ID | DEST domain]")
    return _bad_id(command, args[0]) or await _envelope(port, command, args[0])


async def _overview(port: ControlPort, command: str) -> Answer:
    counted = await port.folder_counts()
    now = time.time()
    by_state: dict[str, int] = {s.value: 0 for s in (State.ACTIVE, State.DEFERRED, State.HELD)}
    oldest: dict[str, float] = {}
    dests: dict[str, dict[str, Any]] = {}
    for summary in list(port.index.values()):
        state = summary.state.value
        by_state[state] = by_state.get(state, 0) + 1
        oldest[state] = max(oldest.get(state, 0.0), now - summary.received)
        for key, count in summary.destinations.items():
            entry = dests.setdefault(key, {"envelopes": 0, "recipients": 0, "next_attempt": None})
            entry["envelopes"] += 1
            entry["recipients"] += count
            if summary.state is State.DEFERRED and summary.next_attempt is not None:
                current = entry["next_attempt"]
                entry["next_attempt"] = min(current or summary.next_attempt, summary.next_attempt)
    dead = port.dead_destinations()
    for key, entry in dests.items():
        entry["next_attempt"] = _when(entry["next_attempt"])
        entry["dead_until"] = _when(dead.get(key))
    states = {
        "incoming": counted["incoming"],
        "active": by_state["active"],
        "deferred": by_state["deferred"],
        "held": by_state["held"],
        **{name: counted[name] for name in COUNTED if name != "incoming"},
    }
    data = {
        "states": states,
        "oldest_seconds": {k: round(v, 1) for k, v in oldest.items()},
        "destinations": dests,
        "suspended": port.suspended,
        "disk_full": _when(port.disk.since),
    }
    text = [f"{'state':12} {'count':>8}  oldest"]
    for name, count in states.items():
        text.append(f"{name:12} {count:8d}  {_age(oldest.get(name))}")
    if port.suspended:
        text.append("taking files: SUSPENDED")
    if port.disk.since is not None:
        text.append(f"disk_full: yes since {_when(port.disk.since)} ({port.disk.reason})")
    if dests:
        width = max(12, *(len(k) for k in dests))
        text.append("")
        text.append(f"{'destination':{width}} {'envelopes':>9} {'recipients':>10}  next retry")
        for key in sorted(dests, key=lambda k: -dests[k]["recipients"]):
            entry = dests[key]
            nxt = entry["next_attempt"] or "-"
            if entry["dead_until"]:
                nxt += f" (not answering until {entry['dead_until']})"
            text.append(f"{key:{width}} {entry['envelopes']:9d} {entry['recipients']:10d}  {nxt}")
    return Answer(OK, command, data, text)


async def _envelope(port: ControlPort, command: str, envelope_id: str) -> Answer:
    record = await port.result(envelope_id)
    summary = port.index.get(envelope_id)
    if summary is not None:
        record["state"] = summary.state.value
    text = [
        f"id        {record['id']}",
        f"source    {record['source']}",
        f"state     {record['state']}   ({record['location']})",
        f"received  {record['received_at']}",
    ]
    if record.get("reason"):
        text.append(f"reason    {record['reason']}")
    for tx in record["transactions"]:
        text.append(f"transaction {tx['number']} from <{tx['mail_from']}>:")
        for r in tx["recipients"]:
            reply = r.get("reply") or {}
            said = f"{reply.get('code', '')} {reply.get('enhanced') or ''} {reply.get('text', '')}"
            extra = f" next {r['next_attempt_at']}" if r.get("next_attempt_at") else ""
            text.append(
                f"  {r['address']:30} {r['status']:9} tries {r['attempts']}{extra}  {said.strip()}"
            )
    return Answer(OK, command, record, text)


def _destination(port: ControlPort, command: str, domain: str) -> Answer:
    key = port.destination_key(domain)
    rows = [s for s in list(port.index.values()) if key in s.destinations]
    dead = port.dead_destinations().get(key)
    data = {
        "destination": key,
        "dead_until": _when(dead),
        "envelopes": [
            {
                "id": s.id,
                "source": s.source,
                "state": s.state.value,
                "recipients": s.destinations[key],
                "next_attempt": _when(s.next_attempt),
            }
            for s in rows
        ],
    }
    text = [f"destination {key}: {len(rows)} envelope(s)"]
    if dead:
        text.append(f"not answering; not tried until {_when(dead)}")
    for s in rows:
        text.append(
            f"  {s.id}  {s.state.value:8} {s.destinations[key]:4d} rcpt  "
            f"next {_when(s.next_attempt) or '-'}  {s.source}"
        )
    return Answer(OK, command, data, text)


async def _stats(port: ControlPort, command: str, args: list[str]) -> Answer:
    s = port.stats
    t = port.traffic()
    p50, p99 = s.latency(0.5), s.latency(0.99)
    data: dict[str, Any] = {
        "uptime_seconds": round(time.time() - s.started, 1),
        "files_taken": s.files_taken,
        "files_rejected": s.files_rejected,
        "files_refused": s.files_refused,
        "recipients_delivered": s.delivered,
        "recipients_failed": s.failed,
        "recipients_deferred": s.deferred,
        "reports_written": s.reports,
        "deadletters_written": s.deadletters,
        "possible_duplicates": s.possible_duplicates,
        "quarantined": s.quarantined,
        "disk_full": port.disk.full,
        "disk_full_pauses": s.disk_full_pauses,
        "connections_opened": t.connections_opened,
        "connections_reused": t.connections_reused,
        "tls_sessions": t.tls_sessions,
        "bytes_sent": t.bytes_sent,
        "dns_lookups": t.dns_lookups,
        "dns_cache_hits": t.dns_cache_hits,
        "dns_queries": t.dns_queries,
        "envelopes_per_second_1m": round(s.rate(60.0), 2),
        "delivery_latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "delivery_latency_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "queue_active": sum(1 for x in port.index.values() if x.state is State.ACTIVE),
        "queue_deferred": sum(1 for x in port.index.values() if x.state is State.DEFERRED),
        "queue_held": sum(1 for x in port.index.values() if x.state is State.HELD),
        "trace_dropped": port.tracer.dropped,
    }
    width = max(len(k) for k in data)
    text = [f"{k:{width}}  {'-' if v is None else v}" for k, v in data.items()]
    return Answer(OK, command, data, text)


def _kinds(args: list[str]) -> set[Kind] | None:
    if len(args) != 1:
        return None
    word = args[0].upper()
    if word == "ALL":
        return set(Kind)
    try:
        return {Kind(word.lower())}
    except ValueError:
        return None


async def _trace(port: ControlPort, command: str, args: list[str]) -> Answer:
    if not args:
        on = sorted(k.value for k in port.tracer.enabled)
        return Answer(OK, command, {"tracing": on}, [f"tracing: {', '.join(on) or 'nothing'}"])
    kinds = _kinds(args)
    if kinds is None:
        return _bad(command, "usage: TRACE RESOLVER|SESSION|SPOOL|ALL")
    port.tracer.enabled |= kinds
    on = sorted(k.value for k in port.tracer.enabled)
    return Answer(OK, command, {"tracing": on}, [f"tracing: {', '.join(on)}"])


async def _notrace(port: ControlPort, command: str, args: list[str]) -> Answer:
    kinds = _kinds(args)
    if kinds is None:
        return _bad(command, "usage: NOTRACE RESOLVER|SESSION|SPOOL|ALL")
    port.tracer.enabled -= kinds
    on = sorted(k.value for k in port.tracer.enabled)
    return Answer(OK, command, {"tracing": on}, [f"tracing: {', '.join(on) or 'nothing'}"])


async def _flush(port: ControlPort, command: str, args: list[str]) -> Answer:
    if not args:
        count = port.flush()
    elif args[0].upper() == "DEST" and len(args) == 2:
        bad = _bad_domain(command, args[1])
        if bad:
            return bad
        count = port.flush(destination=args[1])
    elif len(args) == 1:
        bad = _bad_id(command, args[0])
        if bad:
            return bad
        count = port.flush(envelope_id=_queued(port, args[0]))
    else:
        return _bad(command, "usage: FLUSH [ID | DEST domain]")
    return Answer(OK, command, {"scheduled": count}, [f"{count} envelope(s) to be retried now"])


async def _expire(port: ControlPort, command: str, args: list[str]) -> Answer:
    if len(args) != 1:
        return _bad(command, "usage: EXPIRE domain")
    bad = _bad_domain(command, args[0])
    if bad:
        return bad
    forgot = port.expire(args[0])
    text = f"forgot the DNS answers for {args[0]}" if forgot else f"nothing cached for {args[0]}"
    return Answer(OK, command, {"forgotten": forgot}, [text])


async def _simple(port: ControlPort, command: str, args: list[str]) -> Answer:
    verb = command.split(maxsplit=1)[0]
    if args:
        return _bad(command, f"{verb} takes no argument")
    if verb == "SUSPEND":
        port.suspend()
        return Answer(OK, command, {"suspended": True}, ["taking files and retries suspended"])
    if verb == "RESUME":
        port.resume()
        return Answer(OK, command, {"suspended": False}, ["taking files and retries resumed"])
    if verb == "RELOAD":
        done = port.reload()
        data = {
            "reloaded": done.source,
            "changed": list(done.changed),
            "restart_needed": list(done.restart),
        }
        return Answer(OK, command, data, [done.summary])
    port.stop()
    return Answer(OK, command, {"stopping": True}, ["shutting down: finishing work in flight"])


Handler = Callable[[ControlPort, str, list[str]], Awaitable[Answer]]
_HANDLERS: dict[str, Handler] = {
    "HELP": _help,
    "QUERY": _query,
    "STATS": _stats,
    "TRACE": _trace,
    "NOTRACE": _notrace,
    "FLUSH": _flush,
    "EXPIRE": _expire,
    "SUSPEND": _simple,
    "RESUME": _simple,
    "RELOAD": _simple,
    "SHUTDOWN": _simple,
}


def register(verb: str, handler: Handler, rows: list[tuple[str, str, str]]) -> None:
    """Add or replace a command and its HELP rows (where the verb's rows were, else last)."""
    _HANDLERS[verb] = handler
    at = next((i for i, row in enumerate(HELP) if row[0].split()[0] == verb), len(HELP))
    HELP[:] = [*HELP[:at], *rows, *(r for r in HELP[at:] if r[0].split()[0] != verb)]
