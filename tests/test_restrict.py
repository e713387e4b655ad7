"""Who may send: the submit policy, pure (policy/restrict.py), and through a real worker with a
file owned by the real unprivileged uid nobody."""

from __future__ import annotations

import email
import os
import signal
from pathlib import Path

import pytest

from spoolsmtp.bsmtp import writer
from spoolsmtp.model.config import SenderPolicy, SubmitConfig
from spoolsmtp.policy import restrict
from spoolsmtp.policy.restrict import Submitter
from spoolsmtp.spool import envfile
from tests.helpers import draft, make_config, statuses
from tests.hostile import needs_root, nobody
from tests.smtpservers import SmtpServer
from tests.workerproc import WorkerProcess, start_worker, wait_for

ALICE = Submitter(1000, 1000, "alice", frozenset({"1000", "alice", "50", "batch"}))


@pytest.mark.parametrize(
    ("address", "pattern", "hit"),
    [
        ("boss@example.com", "boss@example.com", True),
        ("Boss@EXAMPLE.com", "boss@example.com", True),
        ("boss2@example.com", "boss@example.com", False),
        ("x@example.com", "@example.com", True),
        ("x@sub.example.com", "@example.com", False),
        ("x@sub.example.com", "*.example.com", True),
        ("x@a.b.EXAMPLE.com", "*.example.com", True),
        ("x@example.com", "*.example.com", False),
        ("x@badexample.com", "*.example.com", False),
    ],
)
def test_restrict_patterns(address: str, pattern: str, hit: bool) -> None:
    assert restrict.matches(address, pattern) is hit


def test_allowed_users_and_groups_by_name_or_number() -> None:
    assert restrict.may_submit(ALICE, SubmitConfig()) is None  # empty: everyone
    assert restrict.may_submit(ALICE, SubmitConfig(allowed_users=("alice",))) is None
    assert restrict.may_submit(ALICE, SubmitConfig(allowed_users=("1000",))) is None
    assert restrict.may_submit(ALICE, SubmitConfig(allowed_groups=("batch",))) is None
    assert restrict.may_submit(ALICE, SubmitConfig(allowed_groups=("50",))) is None
    why = restrict.may_submit(ALICE, SubmitConfig(allowed_users=("bob",), allowed_groups=("ops",)))
    assert why is not None and "uid 1000 (alice) may not submit" in why
    worker = Submitter(0, 0, "root", worker=True)
    assert restrict.may_submit(worker, SubmitConfig(allowed_users=("bob",))) is None


def test_sender_policy_owner() -> None:
    cfg = SubmitConfig(
        sender_policy=SenderPolicy.OWNER,
        senders={"alice": ("alice@example.com", "@billing.example.com"), "1001": ("<>",)},
    )
    assert restrict.sender_fault(ALICE, "alice@example.com", cfg) is None
    assert restrict.sender_fault(ALICE, "ALICE@Example.com", cfg) is None
    assert restrict.sender_fault(ALICE, "run7@billing.example.com", cfg) is None
    why = restrict.sender_fault(ALICE, "ceo@example.com", cfg)
    assert why is not None and "may not send as <ceo@example.com>" in why
    assert restrict.sender_fault(ALICE, "", cfg) is not None
    assert restrict.sender_fault(Submitter(1001, 1001), "", cfg) is None


def test_screen_refuses_transactions_and_recipients_as_refused_commands() -> None:
    env = envfile.read_bytes(
        writer.render(
            [
                draft("alice@example.com", ["ok@example.org", "no@x.example.net"]),
                draft("ceo@example.com", ["ok@example.org"]),
                draft("alice@example.com", ["all@blocked.test"]),
            ],
            "batch.test",
        ),
        "job",
        make_config().limits,
        "spool.test",
    )
    cfg = SubmitConfig(
        restrict=("*.example.net", "@blocked.test"),
        sender_policy=SenderPolicy.OWNER,
        senders={"alice": ("alice@example.com",)},
    )
    out = restrict.screen(env, ALICE, cfg, "alice@spool.test")
    assert [(t.number, [r.address for r in t.recipients]) for t in out.transactions] == [
        (1, ["ok@example.org"])
    ]
    refused = [(e.echo, e.reply.code, e.sender) for e in out.errors]
    assert refused == [
        ("RCPT TO:<no@x.example.net>", 550, "alice@example.com"),
        ("MAIL FROM:<ceo@example.com>", 550, "alice@spool.test"),
        ("RCPT TO:<all@blocked.test>", 550, "alice@example.com"),
    ]
    assert not out.accepted


# -- through a real worker ------------------------------------------------------------------


def drop_as_nobody(w: WorkerProcess, name: str, data: bytes) -> None:
    """Write a file owned by nobody into incoming/ (dot-file, chown, rename)."""
    tmp = w.spool / "incoming" / f".{name}"
    tmp.write_bytes(data)
    os.chown(tmp, *nobody())
    tmp.rename(w.spool / "incoming" / name)


@needs_root
def test_a_file_of_a_user_not_allowed_is_rejected(tmp_path: Path, server: SmtpServer) -> None:
    w = start_worker(tmp_path, server, submit={"allowed_users": ["root", 4242]})
    try:
        body = writer.render([draft("n@example.com", ["a@example.org"])], "batch.test")
        drop_as_nobody(w, "job.bsmtp", body)
        rec = wait_for(lambda: w.final("job.bsmtp"), what="rejected")
    finally:
        assert w.stop() == 0
    assert rec["state"] == "rejected"
    assert f"uid {nobody()[0]} (nobody) may not submit" in rec["reason"]
    assert server.messages == []


@needs_root
def test_an_allowed_user_is_recorded_and_named_in_received(
    tmp_path: Path, server: SmtpServer
) -> None:
    uid, gid = nobody()
    w = start_worker(
        tmp_path,
        server,
        submit={
            "allowed_users": ["nobody"],
            "sender_policy": "owner",
            "senders": {"nobody": ["batch@example.com"]},
            "restrict": ["@blocked.example"],
        },
    )
    try:
        body = writer.render(
            [
                draft("batch@example.com", ["a@example.org", "x@blocked.example"]),
                draft("ceo@example.com", ["a@example.org"]),
            ],
            "batch.test",
        )
        drop_as_nobody(w, "job.bsmtp", body)
        rec = wait_for(lambda: w.final("job.bsmtp"), what="done")
    finally:
        assert w.stop() == 0
    assert (rec["owner_uid"], rec["owner_gid"]) == (uid, gid)
    assert statuses(rec) == {"a@example.org": "delivered"}
    sent = [m for m in server.messages if m.mail_from != "<>"]  # the reports are mailed too
    assert [(m.mail_from, m.rcpt_tos) for m in sent] == [("batch@example.com", ["a@example.org"])]
    msg = email.message_from_bytes(sent[0].content)
    assert f"(uid {uid})" in msg["Received"]
    # each refusal reported: the restricted recipient to its sender, the forged sender to the
    # file's owner (not to the address it tried to use)
    assert any("x@blocked.example" in line for line in rec["batch_errors"])
    assert any("may not send as <ceo@example.com>" in line for line in rec["batch_errors"])
    reports = {p.name: p.read_text() for p in w.files("bounces")}
    to_lines = sorted(
        line
        for text in reports.values()
        for line in text.splitlines()
        if line.startswith("RCPT TO:")
    )
    assert to_lines == ["RCPT TO:<batch@example.com>", "RCPT TO:<nobody@spoolsmtp.test>"]


@needs_root
def test_the_owner_is_checked_when_a_legacy_file_is_converted_first(
    tmp_path: Path, server: SmtpServer
) -> None:
    """With spool.encoding set, a file is converted into a worker-owned copy before it is
    read: the owner checked must still be the submitter."""
    w = start_worker(
        tmp_path, server, spool={"encoding": "cp037"}, submit={"allowed_users": ["root"]}
    )
    try:
        text = "HELO h\nMAIL FROM:<n@example.com>\nRCPT TO:<a@example.org>\nDATA\nhi\n.\nQUIT\n"
        drop_as_nobody(w, "job.bsmtp", text.replace("\n", "\x15").encode("cp037"))
        rec = wait_for(lambda: w.final("job.bsmtp"), what="rejected")
    finally:
        assert w.stop() == 0
    assert rec["state"] == "rejected" and "(nobody) may not submit" in rec["reason"]
    assert server.messages == []


@needs_root
def test_the_owner_survives_a_kill_after_the_file_became_the_workers(tmp_path: Path) -> None:
    """Killed in the first attempt (the file in active/ is by then the worker's copy, and no
    record was written): the restarted worker still knows who submitted it, from the claim."""
    uid, _ = nobody()
    srv = SmtpServer()
    settings = {"smarthost": f"127.0.0.1:{srv.port}", "submit": {"allowed_users": ["nobody"]}}
    try:
        crashing = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "after_rcpt"})
        crashing.start()
        body = writer.render([draft("n@example.com", ["a@example.org"])], "batch.test")
        drop_as_nobody(crashing, "job.bsmtp", body)
        assert crashing.wait_exit() == -signal.SIGKILL
        (copy,) = crashing.files("active")
        assert copy.stat().st_uid == os.geteuid()  # the worker's copy: its owner says nothing
        worker = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: worker.final("job.bsmtp"), what="done after the kill")
        finally:
            assert worker.stop() == 0
    finally:
        srv.stop()
    assert rec["state"] == "done" and rec["owner_uid"] == uid
    (got,) = srv.messages
    assert f"(uid {uid})".encode() in got.content.split(b"\r\n\r\n")[0]
