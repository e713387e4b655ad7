"""The mail log: a real worker's stderr, read as an operator's log tools read it."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.app import logsetup
from spoolsmtp.bsmtp import writer
from spoolsmtp.model import maillog
from spoolsmtp.model.reply import make
from tests.helpers import draft
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import WorkerProcess, start_worker, wait_for

RECIPIENT = re.compile(
    r" (?P<id>\S+): to=<(?P<to>[^>]*)>, relay=(?P<relay>\S+), delay=(?P<delay>[\d.]+), "
    r"delays=(?P<delays>[\d.]+/[\d.]+/[\d.]+/[\d.]+), dsn=(?P<dsn>\d\.\d+\.\d+), "
    r"status=(?P<status>\w+) \((?P<reply>.*)\)$"
)
# the batch: three transactions, a recipient in two of them, a command refused in the file
EXPECTED = {
    ("1", "ok1@example.org"): ("sent", "2.0.0"),
    ("1", "gone@example.org"): ("bounced", "5.1.1"),
    ("1", "busy@example.org"): ("deferred", "4.2.1"),
    ("2", "ok2@example.org"): ("sent", "2.0.0"),
    ("2", "ok1@example.org"): ("sent", "2.0.0"),
    ("3", "ok3@example.org"): ("sent", "2.0.0"),
}


def _server() -> SmtpServer:
    return SmtpServer(
        Script(
            rcpt={
                "gone@example.org": "550 5.1.1 <gone@example.org>: no such user",
                "busy@example.org": "450 4.2.1 mailbox busy, try later",
            }
        )
    )


def _run_batch(tmp_path: Path, srv: SmtpServer, **settings: Any) -> tuple[WorkerProcess, str]:
    """The batch through a real worker (retries far away, so the deferral stays one), the
    operator holding the deferred envelope; its id. The worker is stopped: its log is whole."""
    # reports are mailed by default (tests/test_requeue.py): here only the batch is counted
    w = start_worker(
        tmp_path, srv, retry={"interval": "1h"}, bounces={"requeue": False}, **settings
    )
    try:
        data = writer.render(
            [
                draft("a@example.com", ["ok1@example.org", "gone@example.org", "busy@example.org"]),
                draft("b@example.com", ["ok2@example.org", "ok1@example.org"]),
                draft("c@example.com", ["ok3@example.org"]),
            ],
            "batch.test",
        )
        # a command the reader refuses: the rest of the file is still sent
        data = data.replace(
            b"RCPT TO:<ok3@example.org>\r\n",
            b"RCPT TO:<ok3@example.org>\r\nRCPT TO:<not an address>\r\n",
        )
        w.drop("batch.bsmtp", data)
        w.drop("picture.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR")
        rec = wait_for(lambda: w.in_state("batch.bsmtp", "deferred"), what="batch deferred")
        wait_for(lambda: w.final("picture.png"), what="picture rejected")
        held = w.ask(f"HOLD {rec['id']}")
        assert held["status"] == 200, held
    finally:
        assert w.stop() == 0
        srv.stop()
    return w, rec["id"]


def test_every_recipient_is_logged_once_with_its_status(tmp_path: Path) -> None:
    w, envelope_id = _run_batch(tmp_path, _server())
    lines = w.log.read_text().splitlines()
    found = [m.groupdict() for line in lines if (m := RECIPIENT.search(line))]
    seen = Counter((f["id"], f["to"]) for f in found)
    assert all(n == 1 for n in seen.values()), seen
    assert {
        (f["id"].rpartition(".")[2], f["to"]): (f["status"], f["dsn"]) for f in found
    } == EXPECTED
    assert {f["id"].rpartition(".")[0] for f in found} == {envelope_id}
    by_to = {(f["id"], f["to"]): f for f in found}
    sent = by_to[f"{envelope_id}.1", "ok1@example.org"]
    assert re.fullmatch(r"127\.0\.0\.1\[127\.0\.0\.1\]:\d+", sent["relay"])
    assert sent["reply"] == "250 2.0.0 queued"
    a, b, c, d = (float(x) for x in sent["delays"].split("/"))
    assert float(sent["delay"]) >= max(a, b, c, d)
    assert "no such user" in by_to[f"{envelope_id}.1", "gone@example.org"]["reply"]
    text = "\n".join(lines)
    # taken: one line per transaction, with its sender, size and recipient count
    assert re.search(
        rf" {envelope_id}\.1: from=<a@example\.com>, size=\d+, nrcpt=3 "
        rf"\(file batch\.bsmtp, uid 0\)$",
        text,
        re.M,
    )
    assert re.search(rf" {envelope_id}\.3: from=<c@example\.com>, size=\d+, nrcpt=1 ", text)
    # the refused command, the report, the rejected file, the operator's hold (uid 0: root)
    assert re.search(rf" {envelope_id}: reject: batch\.bsmtp:\d+: 5\d\d ", text)
    assert re.search(
        rf" {envelope_id}: sender non-delivery notification: {envelope_id}\.1\.ndr "
        rf"\(bounces/{envelope_id}\.1\.ndr\.bsmtp\)$",
        text,
        re.M,
    )
    assert re.search(
        r" WARNING picture\.png: reject: picture\.png:1: binary .* \(id \S+\)$", text, re.M
    )
    assert re.search(rf" {envelope_id}: hold by uid 0 \(pid \d+\): {envelope_id} held$", text, re.M)


def test_log_format_json_gives_the_same_fields_one_object_a_line(tmp_path: Path) -> None:
    w, envelope_id = _run_batch(tmp_path, _server(), log_format="json")
    objects = [json.loads(line) for line in w.log.read_text().splitlines()]
    assert all({"time", "level", "pid", "message"} <= set(o) for o in objects)
    recipients = [o for o in objects if o.get("event") == "recipient"]
    seen = Counter((o["id"], o["to"]) for o in recipients)
    assert all(n == 1 for n in seen.values()), seen
    assert {
        (o["id"].rpartition(".")[2], o["to"]): (o["status"], o["dsn"]) for o in recipients
    } == EXPECTED
    assert all(o["level"] == "info" and len(o["delays"]) == 4 for o in recipients)
    (hold,) = [o for o in objects if o.get("event") == "action"]
    assert (hold["id"], hold["command"], hold["uid"]) == (envelope_id, "HOLD", 0)
    assert hold["pid"] != hold["peer_pid"]  # the worker's line, about the ctl client's act
    assert any(o.get("event") == "take" and o["nrcpt"] == 3 for o in objects)
    assert any(o["message"] == "ready" for o in objects)  # every line, not only the mail log's


def test_each_attempt_logs_a_deferral_and_the_last_the_expiry(tmp_path: Path) -> None:
    srv = SmtpServer(Script(rcpt={"never@example.org": "451 4.3.0 come back later"}))
    w = start_worker(
        tmp_path,
        srv,
        retry={"interval": "200ms", "max_interval": "300ms", "max_age": "1s", "warning_age": "0s"},
        bounces={"requeue": False},
    )
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["never@example.org"])])
        rec = wait_for(lambda: w.final("j.bsmtp"), what="expired")
    finally:
        assert w.stop() == 0
        srv.stop()
    found = [
        m.groupdict() for line in w.log.read_text().splitlines() if (m := RECIPIENT.search(line))
    ]
    statuses = [f["status"] for f in found]
    attempts = rec["transactions"][0]["recipients"][0]["attempts"]
    assert statuses == ["deferred"] * attempts + ["expired"]
    assert [f["dsn"] for f in found] == ["4.3.0"] * attempts + ["5.4.7"]
    assert "last reply: 451 4.3.0 come back later" in found[-1]["reply"]
    assert float(found[-1]["delay"]) >= 1.0  # max_age, from arrival


# -- the pure parts ----------------------------------------------------------------------------


def test_a_recipient_line_has_postfix_shape() -> None:
    fields = maillog.recipient(
        "ABC.1",
        "u@example.org",
        "sent",
        make(250, "2.0.0", "Ok: queued as X"),
        maillog.relay_of("mx.example.org", "192.0.2.1", 25),
        1.234,
        (0.5, 0.0, 0.2, 0.534),
    )
    assert maillog.text(fields) == (
        "ABC.1: to=<u@example.org>, relay=mx.example.org[192.0.2.1]:25, delay=1.23, "
        "delays=0.5/0/0.2/0.53, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)"
    )


@pytest.mark.parametrize(
    ("reply", "dsn"),
    [(make(550, None, "no"), "5.0.0"), (make(451, "4.4.1", "x"), "4.4.1")],
)
def test_dsn_comes_from_the_class_when_the_server_gave_none(reply: Any, dsn: str) -> None:
    assert maillog.dsn_of(reply) == dsn


def test_remote_text_cannot_forge_a_log_line() -> None:
    reply = make(550, "5.1.1", "no\nsuch\x1b[2Juser")
    fields = maillog.recipient("A.1", "x@y", "bounced", reply, "none", 0, (0, 0, 0, 0))
    line = maillog.text(fields)
    assert "\n" not in line and "\x1b" not in line
    assert line.endswith("status=bounced (550-5.1.1 no / 550 5.1.1 such\\x1b[2Juser)")


def test_operator_lines_name_each_envelope_and_who() -> None:
    data = {"envelopes": ["A", "B"], "messages": ["A held", "B is already held"]}
    lines = maillog.actions("HOLD ALL", data, 1000, 42, "A held")
    assert [maillog.text(f) for f in lines] == [
        "A: hold by uid 1000 (pid 42): A held",
        "B: hold by uid 1000 (pid 42): B is already held",
    ]
    (flush,) = maillog.actions("FLUSH DEST example.org", {"scheduled": 2}, 0, 7, "2 envelope(s)")
    assert maillog.text(flush) == "control: FLUSH DEST example.org by uid 0 (pid 7): 2 envelope(s)"


def test_report_lines_say_which_report() -> None:
    assert maillog.text(maillog.report("A", "1.ndr", "bounces", "A.1.ndr.bsmtp")) == (
        "A: sender non-delivery notification: A.1.ndr (bounces/A.1.ndr.bsmtp)"
    )
    assert maillog.report("A", "batch.2", "bounces", "n")["kind"] == (
        "sender batch error notification"
    )
    assert maillog.report("A", "2.delay.3", "bounces", "n")["kind"] == "sender delay notification"


def test_the_json_format_keeps_the_line_its_own_time_level_and_pid() -> None:
    fields = maillog.action("HOLD", "A", 1000, 4242, "A held")
    record = logging.LogRecord("spoolsmtp", logging.INFO, "f", 1, "%s", ("text",), None)
    record.maillog = {**fields, "level": "forged", "time": "forged"}
    out = json.loads(logsetup.JsonFormatter().format(record))
    assert out["level"] == "info" and out["time"] != "forged" and out["pid"] == os.getpid()
    assert (out["event"], out["uid"], out["peer_pid"], out["message"]) == (
        "action",
        1000,
        4242,
        "text",
    )
    plain = logging.LogRecord("spoolsmtp", logging.WARNING, "f", 1, "disk %s", ("full",), None)
    assert json.loads(logsetup.JsonFormatter().format(plain)) == {
        "time": json.loads(logsetup.JsonFormatter().format(plain))["time"],
        "level": "warning",
        "pid": os.getpid(),
        "message": "disk full",
    }
