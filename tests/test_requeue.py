"""Reports reach senders (issue 16.5): spoolsmtp delivers its own reports by default, keeps a
copy in bounces/, sends a report that cannot be delivered to deadletter/ and never reports on a
report; a crash between writing a report and delivering it neither loses nor repeats it.

Real parts: a worker process, the real DNS server on loopback (MX records route each domain to
its own SMTP server, on 127.0.0.1 and 127.0.0.2), real SMTP servers, real SIGKILL.
"""

from __future__ import annotations

import email
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flufl.bounce import all_failures

from tests.dnsserver import Zone, serve
from tests.helpers import draft, report_failures
from tests.smtpservers import Message, Script, SmtpServer
from tests.workerproc import WorkerProcess, wait_for

SENDER = "o@example.com"
GONE = "gone@example.org"
FAST_RETRY = {"interval": "200ms", "max_interval": "300ms", "max_age": "1s", "warning_age": "0s"}


@dataclass
class World:
    """example.org's server (refuses ``GONE``) on 127.0.0.1, and the senders' server
    (example.com and spoolsmtp.test, the worker's own domain) on 127.0.0.2, one port; a DNS
    server whose MX records say so."""

    dest: SmtpServer
    senders: SmtpServer
    dns_port: int

    def settings(self, **more: Any) -> dict[str, Any]:
        return {
            "dns": {"nameservers": ["127.0.0.1"], "port": self.dns_port, "allow_loopback": True},
            "delivery": {"port": self.dest.port},
            **more,
        }

    def reports_to(self, address: str) -> list[Message]:
        return [m for m in self.senders.messages if m.rcpt_tos == [address]]


def _pair() -> tuple[SmtpServer, SmtpServer]:
    for _ in range(20):
        dest = SmtpServer(Script(rcpt={GONE: "550 5.1.1 no such user"}))
        try:
            return dest, SmtpServer(host="127.0.0.2", port=dest.port)
        except OSError:  # that port is taken on 127.0.0.2: another pair
            dest.stop()
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


@pytest.fixture
def world() -> Iterator[World]:
    zone = Zone()
    zone.add("mx.example.org", "A", "127.0.0.1")
    zone.add("example.org", "MX", "10 mx.example.org.")
    zone.add("mx.example.com", "A", "127.0.0.2")
    zone.add("example.com", "MX", "10 mx.example.com.")
    zone.add("spoolsmtp.test", "MX", "10 mx.example.com.")
    dest, senders = _pair()
    try:
        with serve(zone) as port:
            yield World(dest, senders, port)
    finally:
        dest.stop()
        senders.stop()


def settled(w: WorkerProcess) -> bool:
    """Nothing waits to be delivered: no envelope in incoming/, active/ or deferred/."""
    return not any(w.files(folder) for folder in ("incoming", "active", "deferred"))


def _start(
    tmp_path: Path, world: World, env: dict[str, str] | None = None, **more: Any
) -> WorkerProcess:
    return WorkerProcess(tmp_path, world.settings(**more), env=env).start()


def test_a_report_is_delivered_to_the_senders_server_by_default(
    tmp_path: Path, world: World
) -> None:
    """By default (no ``bounces`` key) the report is mailed to the sender, from <>, and a copy
    stays in bounces/; the report is an envelope of its own, with its own record."""
    w = _start(tmp_path, world)
    try:
        w.drop_drafts("j.bsmtp", [draft(SENDER, [GONE, "ok@example.org"])])
        original = wait_for(lambda: w.final("j.bsmtp"))
        (msg,) = wait_for(lambda: world.reports_to(SENDER))
        report_rec = wait_for(lambda: w.final(f"{original['id']}.1.ndr.bsmtp"))
    finally:
        assert w.stop() == 0
    assert msg.mail_from in ("", "<>")
    _, failed = all_failures(email.message_from_bytes(msg.content))
    assert {a.decode() for a in failed} == {GONE}
    (copy,) = w.files("bounces")
    assert copy.name == f"{original['id']}.1.ndr.bsmtp"
    assert report_failures(copy) == (set(), {GONE})
    assert report_rec["state"] == "done"
    (tx,) = report_rec["transactions"]
    assert tx["mail_from"] == "" and tx["recipients"][0]["status"] == "delivered"
    assert [m.rcpt_tos for m in world.dest.messages] == [["ok@example.org"]]
    assert w.files("deadletter") == []
    # the mail log leads from the report's own lines back to the mail it reports on
    log, rid = w.log.read_text(), report_rec["id"]
    assert f"{rid}.1: from=<>, " in log and f"(file {original['id']}.1.ndr.bsmtp, " in log
    assert re.search(rf"{rid}\.1: to=<{re.escape(SENDER)}>, .*status=sent", log)


@pytest.mark.parametrize("sender", [SENDER, "postmaster@spoolsmtp.test"])
def test_a_report_that_is_refused_goes_to_deadletter_and_causes_no_other(
    tmp_path: Path, world: World, sender: str
) -> None:
    """The sender's server refuses the report: it is a dead letter (to our postmaster, in
    deadletter/, naming why), its record says failed, and nothing more is sent or written;
    the same when the sender is our own postmaster."""
    world.senders.script.rcpt[sender] = "550 5.1.1 no such sender here"
    w = _start(tmp_path, world)
    try:
        w.drop_drafts("j.bsmtp", [draft(sender, [GONE])])
        original = wait_for(lambda: w.final("j.bsmtp"))
        report_rec = wait_for(lambda: w.final(f"{original['id']}.1.ndr.bsmtp"))
        wait_for(lambda: settled(w) and w.files("deadletter"))
    finally:
        assert w.stop() == 0
    (rcpt,) = report_rec["transactions"][0]["recipients"]
    assert rcpt["status"] == "failed" and rcpt["reply"]["code"] == 550
    (dead,) = w.files("deadletter")
    assert dead.name == f"{report_rec['id']}.1.ndr.bsmtp"
    assert report_failures(dead) == (set(), {sender})
    assert "no such sender here" in dead.read_text()
    assert world.senders.messages == []
    # two envelopes (the message and its report), no third: no report of the report was queued
    assert len(w.records()) == 2 and len(w.files("done")) == 2
    assert len(w.files("bounces")) == 1


def test_a_report_that_expires_is_one_dead_letter_without_delay_warnings(
    tmp_path: Path, world: World
) -> None:
    """A report deferred until it expires gets no delay warning (it could go nowhere but
    deadletter/), then fails once into deadletter/."""
    world.senders.script.rcpt[SENDER] = "451 4.3.0 try later"
    # a warning due after 100 ms (0 would mean never), long before the report expires
    w = _start(tmp_path, world, retry={**FAST_RETRY, "warning_age": "100ms"})
    try:
        w.drop_drafts("j.bsmtp", [draft(SENDER, [GONE])])
        original = wait_for(lambda: w.final("j.bsmtp"))
        report_rec = wait_for(lambda: w.final(f"{original['id']}.1.ndr.bsmtp"))
        wait_for(lambda: settled(w) and w.files("deadletter"))
    finally:
        assert w.stop() == 0
    (rcpt,) = report_rec["transactions"][0]["recipients"]
    assert rcpt["status"] == "failed" and rcpt["reply"]["enhanced"] == "5.4.7"
    (dead,) = w.files("deadletter")
    assert dead.name == f"{report_rec['id']}.1.ndr.bsmtp"
    assert len(w.records()) == 2


def test_requeue_false_writes_reports_to_bounces_only(tmp_path: Path, world: World) -> None:
    w = _start(tmp_path, world, bounces={"requeue": False})
    try:
        w.drop_drafts("j.bsmtp", [draft(SENDER, [GONE])])
        original = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        assert w.stop() == 0
    # the report is written before the record says done: had it been queued, it would be
    (copy,) = w.files("bounces")
    assert copy.name == f"{original['id']}.1.ndr.bsmtp"
    assert [r["id"] for r in w.records()] == [original["id"]]
    assert len(w.files("done")) == 1 and w.files("deferred") == []
    assert world.senders.messages == []


@pytest.mark.parametrize(
    "phase", ["writing_bounce", "queueing_report", "queued_report", "report_committed"]
)
def test_a_crash_between_writing_a_report_and_its_delivery_neither_loses_nor_repeats_it(
    tmp_path: Path, world: World, phase: str
) -> None:
    """kill -9 before the copy is written, after the report's id is journaled, after its
    envelope is written but before the report is journaled, and after that: once restarted,
    the sender gets the report exactly once, and bounces/ holds one copy."""
    crashing = _start(tmp_path, world, env={"SPOOLSMTP_CRASH_AT": phase})
    crashing.drop_drafts("j.bsmtp", [draft(SENDER, [GONE])])
    assert crashing.wait_exit() == -signal.SIGKILL
    w = _start(tmp_path, world)
    try:
        original = wait_for(lambda: w.final("j.bsmtp"), what=f"final after {phase}")
        wait_for(lambda: world.reports_to(SENDER), what="the report delivered")
        wait_for(lambda: settled(w), what="nothing left to deliver")
    finally:
        assert w.stop() == 0
    assert len(world.reports_to(SENDER)) == 1, phase
    (copy,) = w.files("bounces")
    assert copy.name == f"{original['id']}.1.ndr.bsmtp"
    assert len(w.records()) == 2 and len(w.files("done")) == 2
    assert w.files("deadletter") == []
