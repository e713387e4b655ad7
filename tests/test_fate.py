"""The fate of an envelope through one attempt (spoolsmtp/fate.py): plain values in, a plan out,
with a fake ``now`` and a seeded random source; no worker, no sockets, no clock."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from spoolsmtp.model.config import RetryConfig
from spoolsmtp.model.envelope import Envelope, MailParams, Message, Notify, Recipient, Transaction
from spoolsmtp.model.outcome import RecipientResult, Status, result
from spoolsmtp.model.record import RcptRecord, RcptStatus, Record, State, TxRecord, iso, parse_iso
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.policy.dsn import Kind
from spoolsmtp.policy.fate import Fate, Plan

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
CFG = RetryConfig(
    interval=60.0, max_interval=3600.0, max_age=86400.0, warning_age=4 * 3600.0,
    dead_destination=300.0,
)  # fmt: skip
OK = make(250, "2.0.0", "ok")
BUSY = make(451, "4.3.0", "try later")
NO_SUCH = make(550, "5.1.1", "no such user")
UNREACHABLE = make(451, "4.4.1", "no host answered")
NEVER: frozenset[Notify] = frozenset()


def rcpt(address: str, notify: frozenset[Notify] | None = None) -> Recipient:
    return Recipient(address, notify)


def tx(number: int, *rcpts: Recipient, sender: str = "sender@example.com") -> Transaction:
    message = Message(0, 0, True, 0, 0, False, 0)
    return Transaction(number, 1, "helo", sender, MailParams(), tuple(rcpts), message)


def envelope(*txs: Transaction) -> Envelope:
    return Envelope("source", tuple(txs), ())


def record_of(env: Envelope, received: datetime = T0, **fields: object) -> Record:
    record = Record("ID", "source", State.ACTIVE, iso(received), iso(received))
    for t in env.transactions:
        recs = [RcptRecord(r.address) for r in t.recipients]
        record.transactions.append(TxRecord(t.number, t.mail_from, recs))
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def key(domain: str) -> str:
    return f"dest:{domain}"


def attempt(
    env: Envelope,
    record: Record,
    replies: Mapping[str, RecipientResult | Reply],
    *,
    now: datetime = T0,
    hold: bool = False,
    seed: int = 1,
    cfg: RetryConfig = CFG,
    dead: dict[str, float] | None = None,
) -> tuple[Fate, Plan]:
    """One attempt: each recipient sent to gets ``replies[address]`` (a Reply, or a whole
    RecipientResult); the plan, applied to ``record`` the way the worker applies it."""
    fate = Fate(record, env, now, cfg, key)
    for t in env.transactions:
        todo = fate.todo(t, dead or {}, now)
        results: list[RecipientResult] = []
        for r in todo.alive:
            given = replies[r.address]
            results.append(given if isinstance(given, RecipientResult) else result(r, given, "mx"))
        tried = fate.tried(t, [*results, *todo.not_tried], now)
        for change in tried.recipients:
            change.apply(record.find(change.tx, change.address))
    plan = fate.conclude(hold=hold, rng=random.Random(seed))
    return fate, plan


def only(plan: Plan, kind: Kind) -> list[str]:
    return [r.tag for r in plan.reporting.reports if r.kind is kind]


# -- retry -------------------------------------------------------------------------------------


def test_a_deferred_recipient_is_tried_again_after_the_interval_spread_by_a_fifth() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    seen = set()
    for seed in range(50):
        _, plan = attempt(env, record_of(env), {"a@x.test": BUSY}, seed=seed)
        (retry,) = plan.retries
        assert retry.status == "deferred" and retry.attempts == 1
        wait = (parse_iso(retry.next_attempt_at or "") - T0).total_seconds()
        assert 0.8 * 60 <= wait <= 1.2 * 60
        seen.add(wait)
    assert len(seen) > 10  # a burst of deferrals does not come back as a burst


def test_the_same_seed_gives_the_same_plan() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")))
    plans = [attempt(env, record_of(env), dict.fromkeys(("a@x.test", "b@y.test"), BUSY))[1]]
    plans.append(attempt(env, record_of(env), dict.fromkeys(("a@x.test", "b@y.test"), BUSY))[1])
    assert plans[0] == plans[1]


def test_the_backoff_doubles_per_attempt_up_to_max_interval() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    for attempts, base in ((1, 60), (2, 120), (4, 480), (7, 3600), (20, 3600)):
        record = record_of(env)
        record.find(1, "a@x.test").attempts = attempts - 1
        _, plan = attempt(env, record, {"a@x.test": BUSY})
        wait = (parse_iso(plan.retries[0].next_attempt_at or "") - T0).total_seconds()
        assert 0.8 * base <= wait <= min(1.2 * base, 3600), attempts


def test_the_next_attempt_is_never_after_the_moment_of_expiry() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    now = T0 + timedelta(seconds=CFG.max_age - 10)
    _, plan = attempt(env, record_of(env), {"a@x.test": BUSY}, now=now)
    assert plan.due == T0 + timedelta(seconds=CFG.max_age)
    assert plan.state is State.DEFERRED and plan.folder == "deferred"


def test_the_envelope_is_due_at_its_first_next_attempt_to_the_millisecond() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")))
    record = record_of(env)
    record.find(1, "b@y.test").attempts = 5
    _, plan = attempt(env, record, {"a@x.test": BUSY, "b@y.test": BUSY})
    times = [parse_iso(r.next_attempt_at or "") for r in plan.retries]
    assert plan.due == min(times)
    assert plan.due is not None and plan.due.microsecond % 1000 == 0


# -- expiry ------------------------------------------------------------------------------------


def test_after_max_age_a_deferred_recipient_fails_with_554_547_and_its_last_reply() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")))
    now = T0 + timedelta(seconds=CFG.max_age)
    _, plan = attempt(env, record_of(env), {"a@x.test": BUSY, "b@y.test": OK}, now=now)
    (gone,) = plan.expired
    assert gone.address == "a@x.test" and gone.status == "failed"
    assert gone.reply is not None and (gone.reply.code, gone.reply.enhanced) == (554, "5.4.7")
    assert "delivery time expired after 1d" in gone.reply.text
    assert "last reply: 451 4.3.0 try later" in gone.reply.text
    assert plan.counts.failed == 1
    (report,) = plan.reporting.reports
    assert report.kind is Kind.FAILURE and [i.address for i in report.items] == ["a@x.test"]
    assert report.items[0].reply == gone.reply
    assert report.retry_until == T0 + timedelta(seconds=CFG.max_age)
    assert plan.state is State.DONE and plan.due is None and not plan.retries


def test_a_recipient_is_not_expired_before_max_age() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    now = T0 + timedelta(seconds=CFG.max_age - 1)
    _, plan = attempt(env, record_of(env), {"a@x.test": BUSY}, now=now)
    assert plan.expired == () and plan.state is State.DEFERRED


# -- delay warnings ----------------------------------------------------------------------------


def test_a_delay_warning_is_planned_once_after_warning_age() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    early = T0 + timedelta(seconds=CFG.warning_age - 1)
    _, plan = attempt(env, record_of(env), {"a@x.test": BUSY}, now=early)
    assert plan.reporting.reports == () and not plan.reporting.warned
    late = T0 + timedelta(seconds=CFG.warning_age)
    _, plan = attempt(env, record_of(env), {"a@x.test": BUSY}, now=late)
    assert only(plan, Kind.DELAY) == ["1.delay"] and plan.reporting.warned
    assert plan.reporting.reports[0].marks == ()  # a warning does not make a recipient reported
    _, plan = attempt(env, record_of(env, warned=True), {"a@x.test": BUSY}, now=late)
    assert plan.reporting.reports == ()


def test_no_delay_warning_when_warning_age_is_not_before_max_age() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    cfg = RetryConfig(interval=60.0, max_age=3600.0, warning_age=3600.0)
    now = T0 + timedelta(seconds=3000)
    _, plan = attempt(env, record_of(env), {"a@x.test": BUSY}, now=now, cfg=cfg)
    assert plan.reporting.reports == () and not plan.reporting.warned


# -- NOTIFY ------------------------------------------------------------------------------------


def notify_case(
    notify: frozenset[Notify] | None, reply: Reply | RecipientResult, now: datetime = T0
) -> list[Kind]:
    env = envelope(tx(1, rcpt("a@x.test", notify)))
    _, plan = attempt(env, record_of(env), {"a@x.test": reply}, now=now)
    return [r.kind for r in plan.reporting.reports]


WARN = T0 + timedelta(seconds=CFG.warning_age)


def test_without_notify_failures_and_delays_are_reported_and_successes_not() -> None:
    assert notify_case(None, NO_SUCH) == [Kind.FAILURE]
    assert notify_case(None, BUSY, WARN) == [Kind.DELAY]
    assert notify_case(None, OK) == []


def test_notify_never_reports_nothing_but_the_failure_counts_as_reported() -> None:
    assert notify_case(NEVER, NO_SUCH) == []
    assert notify_case(NEVER, BUSY, WARN) == []
    assert notify_case(NEVER, OK) == []
    env = envelope(tx(1, rcpt("a@x.test", NEVER)))
    _, plan = attempt(env, record_of(env), {"a@x.test": NO_SUCH})
    (settled,) = plan.reporting.settled
    assert settled.address == "a@x.test" and settled.reported


def test_notify_success_reports_a_success_and_only_that() -> None:
    wanted = frozenset({Notify.SUCCESS})
    assert notify_case(wanted, OK) == [Kind.SUCCESS]
    assert notify_case(wanted, NO_SUCH) == []
    assert notify_case(wanted, BUSY, WARN) == []


def test_notify_failure_reports_failures_and_no_delay() -> None:
    wanted = frozenset({Notify.FAILURE})
    assert notify_case(wanted, NO_SUCH) == [Kind.FAILURE]
    assert notify_case(wanted, BUSY, WARN) == []
    assert notify_case(wanted, OK) == []


def test_notify_delay_warns_of_a_delay_and_reports_no_failure() -> None:
    wanted = frozenset({Notify.DELAY})
    assert notify_case(wanted, BUSY, WARN) == [Kind.DELAY]
    assert notify_case(wanted, NO_SUCH) == []


def test_a_success_the_next_hop_reports_is_not_reported_by_us() -> None:
    wanted = frozenset({Notify.SUCCESS})
    env = envelope(tx(1, rcpt("a@x.test", wanted)))
    relayed = RecipientResult(env.transactions[0].recipients[0], Status.DELIVERED, OK, "mx")
    _, plan = attempt(env, record_of(env), {"a@x.test": relayed})
    assert [r.kind for r in plan.reporting.reports] == [Kind.SUCCESS]
    relayed = RecipientResult(relayed.recipient, Status.DELIVERED, OK, "mx.test", dsn_relayed=True)
    _, plan = attempt(env, record_of(env), {"a@x.test": relayed})
    assert plan.reporting.reports == ()
    assert plan.state is State.DONE


def test_a_report_marks_its_recipients_reported_and_is_not_planned_again() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")))
    record = record_of(env)
    _, plan = attempt(env, record, {"a@x.test": NO_SUCH, "b@y.test": BUSY})
    (report,) = plan.reporting.reports
    assert report.tag == "1.ndr" and [m.address for m in report.marks] == ["a@x.test"]
    assert all(m.reported for m in report.marks)
    for mark in report.marks:
        mark.apply(record.find(mark.tx, mark.address))
    record.reports.append(report.tag)
    _, plan = attempt(env, record, {"b@y.test": OK})
    assert plan.reporting.reports == () and plan.state is State.DONE


def test_a_later_failure_in_the_same_transaction_gets_a_report_tag_of_its_own() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")), tx(2, rcpt("c@x.test")))
    record = record_of(env, reports=["1.ndr"])
    first = record.find(1, "a@x.test")
    first.status, first.reported = RcptStatus.FAILED, True
    first.reply = make(550, "5.1.1", "no")
    _, plan = attempt(env, record, {"b@y.test": NO_SUCH, "c@x.test": NO_SUCH})
    assert [(r.tag, [i.address for i in r.items]) for r in plan.reporting.reports] == [
        ("1.ndr.2", ["b@y.test"]),
        ("2.ndr", ["c@x.test"]),
    ]


def test_a_report_names_reply_host_and_last_attempt() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    now = T0 + timedelta(minutes=3)
    _, plan = attempt(env, record_of(env), {"a@x.test": NO_SUCH}, now=now)
    (item,) = plan.reporting.reports[0].items
    assert (item.reply, item.remote_mta, item.last_attempt) == (NO_SUCH, "mx", now)
    assert not item.local
    assert plan.reporting.reports[0].arrival == T0 and plan.reporting.reports[0].now == now


# -- dead destinations -------------------------------------------------------------------------


def test_a_destination_none_of_whose_hosts_answered_is_dead_for_dead_destination() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@x.test"), rcpt("c@y.test")))
    fate = Fate(record_of(env), env, T0, CFG, key)
    t = env.transactions[0]
    todo = fate.todo(t, {}, T0)
    assert [r.address for r in todo.alive] == ["a@x.test", "b@x.test", "c@y.test"]
    at = T0 + timedelta(seconds=7)
    results = [result(r, UNREACHABLE, "mx.test") for r in todo.alive[:2]]
    results.append(result(todo.alive[2], make(451, "4.4.1", "half"), "mx.test"))
    results.append(result(todo.alive[2], OK, "mx2.test"))
    tried = fate.tried(t, results, at)
    assert [(d.key, d.until) for d in tried.dead] == [("dest:x.test", at + timedelta(seconds=300))]


def test_an_unreachable_reply_decided_here_does_not_kill_a_destination() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    fate = Fate(record_of(env), env, T0, CFG, key)
    t = env.transactions[0]
    local = result(t.recipients[0], UNREACHABLE, local=True)
    assert fate.tried(t, [local], T0).dead == ()


def test_no_destination_dies_when_dead_destination_is_off() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    cfg = RetryConfig(dead_destination=0.0)
    fate = Fate(record_of(env), env, T0, cfg, key)
    t = env.transactions[0]
    assert fate.tried(t, [result(t.recipients[0], UNREACHABLE, "mx.test")], T0).dead == ()


def test_a_recipient_of_a_dead_destination_is_not_tried_and_not_counted_as_an_attempt() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")))
    record = record_of(env)
    dead = {"dest:x.test": (T0 + timedelta(seconds=1)).timestamp()}
    fate = Fate(record, env, T0, CFG, key)
    todo = fate.todo(env.transactions[0], dead, T0)
    assert [r.address for r in todo.alive] == ["b@y.test"]
    (skipped,) = todo.not_tried
    assert skipped.status is Status.DEFERRED and skipped.local and skipped.host is None
    assert (skipped.reply.code, skipped.reply.enhanced) == (451, "4.4.1")
    assert "dest:x.test not answering; not tried" in skipped.reply.text
    _, plan = attempt(env, record, {"b@y.test": OK}, dead=dead)
    (retry,) = plan.retries
    assert retry.address == "a@x.test" and retry.status == "deferred"
    assert retry.attempts == 0 and retry.decided_locally and retry.last_attempt_at is None
    assert not fate.tried(env.transactions[0], [skipped], T0).dead  # not tried: no verdict


def test_a_dead_mark_that_has_run_out_is_tried_again() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    dead = {"dest:x.test": T0.timestamp()}
    todo = Fate(record_of(env), env, T0, CFG, key).todo(env.transactions[0], dead, T0)
    assert [r.address for r in todo.alive] == ["a@x.test"] and not todo.not_tried


# -- where the envelope goes -------------------------------------------------------------------


def test_an_envelope_held_by_the_operator_goes_to_hold_after_the_attempt() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    _, plan = attempt(env, record_of(env), {"a@x.test": BUSY}, hold=True)
    assert plan.state is State.HELD and plan.folder == "hold" and plan.retries
    _, plan = attempt(env, record_of(env), {"a@x.test": OK}, hold=True)
    assert plan.state is State.DONE  # nothing left to hold


def test_an_envelope_whose_recipients_are_all_final_is_done() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")), tx(2, rcpt("c@z.test")))
    replies = {"a@x.test": OK, "b@y.test": NO_SUCH, "c@z.test": OK}
    _, plan = attempt(env, record_of(env), replies)
    assert plan.state is State.DONE and plan.folder == "done" and plan.due is None


def test_a_recipient_final_before_this_attempt_is_not_tried_again() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")))
    record = record_of(env)
    record.find(1, "a@x.test").status = RcptStatus.DELIVERED
    todo = Fate(record, env, T0, CFG, key).todo(env.transactions[0], {}, T0)
    assert [r.address for r in todo.alive] == ["b@y.test"]
    assert not Fate(record, env, T0, CFG, key).todo(tx(1), {}, T0)


# -- counters and the record -------------------------------------------------------------------


def test_a_deferral_after_the_dot_is_a_possible_duplicate_and_counted() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")))
    fate = Fate(record_of(env), env, T0, CFG, key)
    t = env.transactions[0]
    lost = result(t.recipients[0], make(451, "4.4.2", "connection lost"), "mx", after_dot=True)
    tried = fate.tried(t, [lost, result(t.recipients[1], OK, "mx")], T0)
    assert [r.possible_duplicate for r in tried.recipients] == [True, False]
    counts = tried.counts
    assert (counts.possible_duplicates, counts.deferred, counts.delivered) == (1, 1, 1)
    assert tried.delivered
    again = fate.tried(t, [result(t.recipients[0], BUSY, "mx")], T0).recipients[0]
    assert again.possible_duplicate  # once a possible duplicate, always one


def test_a_result_sets_status_reply_host_and_attempt_times() -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    record = record_of(env)
    earlier = iso(T0 - timedelta(hours=1))
    rec = record.find(1, "a@x.test")
    rec.attempts, rec.first_attempt_at, rec.host = 2, earlier, "old.test"
    now = T0 + timedelta(seconds=5)
    fate = Fate(record, env, now, CFG, key)
    t = env.transactions[0]
    (new,) = fate.tried(t, [result(t.recipients[0], NO_SUCH, "mx.test")], now).recipients
    assert (new.status, new.reply, new.host, new.attempts) == ("failed", NO_SUCH, "mx.test", 3)
    assert (new.first_attempt_at, new.last_attempt_at) == (earlier, iso(now))
    assert new.next_attempt_at is None and new.final


def test_the_fate_reads_the_record_and_never_writes_it() -> None:
    env = envelope(tx(1, rcpt("a@x.test"), rcpt("b@y.test")))
    record = record_of(env)
    before = record.to_json()
    fate = Fate(record, env, T0 + timedelta(days=2), CFG, key)
    t = env.transactions[0]
    fate.tried(t, [result(r, NO_SUCH, "mx") for r in t.recipients[:1]], T0)
    fate.conclude(hold=False, rng=random.Random(0))
    assert record.to_json() == before


@pytest.mark.parametrize("status", ["delivered", "failed"])
def test_applying_a_change_round_trips_through_the_record(status: str) -> None:
    env = envelope(tx(1, rcpt("a@x.test")))
    record = record_of(env)
    reply = OK if status == "delivered" else NO_SUCH
    _, _plan = attempt(env, record, {"a@x.test": reply})
    again = Record.from_json(record.to_json())
    fate = Fate(again, env, T0, CFG, key)
    assert fate.rcpt(1, "a@x.test") == Fate(record, env, T0, CFG, key).rcpt(1, "a@x.test")
    assert fate.rcpt(1, "a@x.test").reply == reply


def test_a_timed_result_keeps_every_other_field() -> None:
    """``timed`` builds the copy field by field: a field added to ``RecipientResult`` and not
    to ``timed`` would be lost, and fails here (every field is given a value not its default)."""
    samples: dict[str, object] = {
        "recipient": Recipient("a@example.org"),
        "status": Status.DEFERRED,
        "reply": make(451, "4.4.2", "connection lost after the final dot"),
        "host": "mx.example.org",
        "address": "192.0.2.1",
        "after_dot": True,
        "local": True,
        "dsn_relayed": True,
        "setup": 1.5,
        "transfer": 2.5,
    }
    assert [f.name for f in dataclasses.fields(RecipientResult)] == list(samples)
    res = RecipientResult(**samples)  # type: ignore[arg-type]
    for f in dataclasses.fields(RecipientResult):
        assert getattr(res, f.name) != f.default, f.name
    assert res.timed(0.25, 0.5) == dataclasses.replace(res, setup=0.25, transfer=0.5)
