"""Batch job integration: submit, --wait, the sendmail entry point, legacy EBCDIC files."""

from __future__ import annotations

import asyncio
import os
import pwd
import resource
import signal
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolsmtp.app import cli
from spoolsmtp.app.submit import Submission, build, recipients_from_headers
from spoolsmtp.model import config
from spoolsmtp.spool import durable
from spoolsmtp.spool.watcher import LoopInotify
from tests.helpers import SENDMAIL
from tests.smtpservers import Message, Script, SmtpServer
from tests.workerproc import WorkerProcess, run, spoolsmtp, wait_for

MESSAGE = (
    b"From: Nightly Job <oper@example.com>\r\n"
    b"To: alice@example.org\r\n"
    b"Date: Mon, 23 Nov 2026 01:00:00 +0000\r\n"
    b"Message-ID: <nightly-42@example.com>\r\n"
    b"Subject: nightly report\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac\r\n"
    b"\r\n"
    b"end\r\n"
)


def without_received(msg: Message) -> bytes:
    """The stored message less the one (folded) Received header we add."""
    assert msg.content.startswith(b"Received: ")
    end = msg.content.index(b"\r\n") + 2
    while msg.content[end : end + 1] in (b" ", b"\t"):
        end = msg.content.index(b"\r\n", end) + 2
    return msg.content[end:]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[WorkerProcess, SmtpServer]]:
    srv = SmtpServer(
        Script(
            rcpt={
                "gone@example.org": "550 5.1.1 no such user",
                "busy@example.org": "451 4.3.0 later",
            }
        )
    )
    w = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{srv.port}"}).start()
    yield w, srv
    w.kill()
    srv.stop()


def test_submit_then_the_worker_delivers_byte_exact(
    world: tuple[WorkerProcess, SmtpServer],
) -> None:
    w, srv = world
    done = run(
        spoolsmtp("submit", "--config", str(w.config), "-i", "alice@example.org"), w.root, MESSAGE
    )
    assert done.returncode == 0, done.stderr
    envelope_id = done.stdout.decode().strip()
    rec = wait_for(lambda: w.final(f"{envelope_id}.bsmtp"))
    assert rec["id"] == envelope_id
    (msg,) = srv.messages
    assert msg.mail_from.endswith("@spoolsmtp.test")
    assert without_received(msg) == MESSAGE


def test_submit_works_without_a_worker_and_adds_missing_headers(tmp_path: Path) -> None:
    (tmp_path / "conf.yaml").write_text(f"hostname: h.test\nspool:\n  path: {tmp_path}/spool\n")
    (tmp_path / "spool" / "incoming").mkdir(parents=True)
    done = run(
        spoolsmtp("submit", "--config", "conf.yaml", "-f", "job@example.com", "a@example.org"),
        tmp_path,
        b"Subject: x\n\nbody\n.\nafter the dot\n",
    )
    assert done.returncode == 0, done.stderr
    envelope_id = done.stdout.decode().strip()
    data = (tmp_path / "spool" / "incoming" / f"{envelope_id}.bsmtp").read_bytes()
    assert b"MAIL FROM:<job@example.com>" in data
    assert b"Message-ID: <" + envelope_id.encode() + b"@h.test>" in data
    assert b"Date: " in data and b"From: <job@example.com>" in data
    assert b"after the dot" not in data
    check = run(
        spoolsmtp("check", "--config", "conf.yaml", f"spool/incoming/{envelope_id}.bsmtp"),
        tmp_path,
        b"",
    )
    assert check.returncode == 0, check.stdout


def test_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    message = (
        b"To: Alice <alice@example.org>, bob@example.net\r\nCc: carol@example.com\r\n"
        b"Bcc: secret@example.com,\r\n  hidden@example.com\r\nSubject: s\r\n\r\n"
        b"Bcc: in the body stays\r\n"
    )
    found, kept = recipients_from_headers(message)
    assert found == [
        "alice@example.org",
        "bob@example.net",
        "carol@example.com",
        "secret@example.com",
        "hidden@example.com",
    ]
    assert b"secret" not in kept.split(b"\r\n\r\n")[0] and b"hidden" not in kept
    assert kept.endswith(b"\r\n\r\nBcc: in the body stays\r\n")
    cfg = config.parse("hostname: h.test\n")
    _, data = build(
        cfg, Submission(sender="o@example.com", recipients=(), from_headers=True), message
    )
    assert data.count(b"RCPT TO:") == 5


@pytest.mark.parametrize(
    ("rcpt", "wait", "code", "status"),
    [
        ("alice@example.org", "30", 0, "delivered"),
        ("gone@example.org", "30", 67, "failed"),
        ("busy@example.org", "1", 75, "deferred"),
    ],
)
def test_wait_exit_codes(
    world: tuple[WorkerProcess, SmtpServer], rcpt: str, wait: str, code: int, status: str
) -> None:
    w, _ = world
    done = run(
        spoolsmtp("submit", "--config", str(w.config), f"--wait={wait}", "--json", rcpt),
        w.root,
        b"Subject: w\r\n\r\nx\r\n",
    )
    assert done.returncode == code, done.stderr
    import json

    record = json.loads(done.stdout)
    assert record["transactions"][0]["recipients"][0]["status"] == status


def test_sendmail_driven_as_cron_drives_it(world: tuple[WorkerProcess, SmtpServer]) -> None:
    w, srv = world
    cron_mail = (
        b"From: root (Cron Daemon)\nTo: alice@example.org\nSubject: Cron <root@h> run-parts\n"
        b"Content-Type: text/plain; charset=UTF-8\n\n/etc/cron.daily/logrotate:\n.\nerror: x\n"
    )
    done = run(
        [str(SENDMAIL), "-i", "-FCronDaemon", "-oem", "-oi", "-t"],
        w.root,
        cron_mail,
        env={"SPOOLSMTP_CONFIG": str(w.config)},
    )
    assert done.returncode == 0, done.stderr
    wait_for(lambda: srv.messages)
    (msg,) = srv.messages
    assert msg.rcpt_tos == ["alice@example.org"]
    body = without_received(msg)
    assert body.endswith(b"/etc/cron.daily/logrotate:\r\n.\r\nerror: x\r\n")
    assert b"From: root@spoolsmtp.test (Cron Daemon)" in body


def test_sendmail_refuses_modes_it_does_not_have(tmp_path: Path) -> None:
    done = run([str(SENDMAIL), "-bp"], tmp_path, b"")
    assert done.returncode == 64
    assert b"not supported" in done.stderr


def test_an_ebcdic_envelope_delivers_the_same_message_as_its_utf8_twin(tmp_path: Path) -> None:
    lines = [
        "HELO mvs01",
        "MAIL FROM:<batch@example.com>",
        "RCPT TO:<alice@example.org>",
        "DATA",
        "Subject: payroll run",
        "",
        "Records processed: 1042",
        ".leading dot",
        "",
        "End of report",
        ".",
        "QUIT",
    ]
    utf8 = "".join(line + "\n" for line in lines).encode()
    ebcdic = b"".join(line.ljust(80).encode("cp037") + b"\x15" for line in lines)
    results = []
    for name, data, spool in (
        ("twin", utf8, {}),
        ("ebcdic", ebcdic, {"encoding": "cp037", "strip_trailing_blanks": True}),
    ):
        srv = SmtpServer()
        root = tmp_path / name
        root.mkdir()
        w = WorkerProcess(root, {"smarthost": f"127.0.0.1:{srv.port}", "spool": spool}).start()
        try:
            w.drop(f"{name}.bsmtp", data)
            source = f"{name}.bsmtp"
            rec = wait_for(lambda: w.final(source))  # noqa: B023 - used before the loop moves on
            assert rec["state"] == "done", rec
            assert w.files("active") == []
        finally:
            w.stop()
            srv.stop()
        results.append(without_received(srv.messages[0]))
    assert results[0] == results[1]
    expected = b"Subject: payroll run\r\n\r\nRecords processed: 1042\r\nleading dot\r\n"
    assert results[0] == expected + b"\r\nEnd of report\r\n"


def _ignore_xfsz_and_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))


def test_a_full_spool_fails_with_75_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "conf.yaml").write_text(f"spool:\n  path: {tmp_path}/spool\n")
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    done = run(
        spoolsmtp("submit", "--config", "conf.yaml", "a@example.org"),
        tmp_path,
        b"Subject: big\n\n" + b"x" * 70 + b"\n" * 1 + (b"y" * 70 + b"\n") * 100,
        preexec_fn=_ignore_xfsz_and_limit,
    )
    assert done.returncode == 75, done.stderr
    assert b"full" in done.stderr
    assert list(incoming.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_a_read_only_spool_fails_with_73_and_leaves_nothing() -> None:
    base = Path(tempfile.mkdtemp(prefix="spoolsmtp-ro-"))
    try:
        base.chmod(0o755)
        incoming = base / "spool" / "incoming"
        incoming.mkdir(parents=True)
        (base / "spool").chmod(0o755)
        incoming.chmod(0o555)
        conf = base / "conf.yaml"
        conf.write_text(f"spool:\n  path: {base}/spool\n")
        message = base / "message.txt"
        message.write_bytes(b"Subject: x\n\nbody\n")
        nobody = pwd.getpwnam("nobody")
        pid = os.fork()
        if pid == 0:  # the child: drop privileges, submit, report the exit code
            code = 1
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)

                code = cli.main(
                    ["submit", "--config", str(conf), "--file", str(message), "a@example.org"]
                )
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 73
        assert list(incoming.iterdir()) == []
    finally:
        for path in sorted(base.rglob("*"), reverse=True):
            path.chmod(0o755) if path.is_dir() else path.unlink()
        for path in sorted(base.rglob("*"), reverse=True):
            path.rmdir()
        base.rmdir()


def test_a_submitted_file_arrives_closed_for_writing(tmp_path: Path) -> None:
    """What submit writes into incoming/ arrives by rename and is already closed for
    writing: inotify tells of it once, as renamed in (taken at once), and never as closed
    after writing under its own name. Before, submit closed it only after the rename: that
    close came as a file written in place, and a worker that tried to take the file in
    between found a writer (its read lease failed) and let it wait out settle_seconds (an
    operator trial saw every submit wait 2 s)."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    seen: list[tuple[str, bool]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watch = LoopInotify(
            folder, loop, lambda name, moved: seen.append((name, moved)), lambda: None
        )
        try:
            at = durable.open_folder(folder)
            try:
                durable.write_new_at(at, "ID.bsmtp", b"HELO x\r\n")
            finally:
                os.close(at)
            async with asyncio.timeout(10):
                while ("ID.bsmtp", True) not in seen:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0)  # one more turn: the events of one read are all handled
        finally:
            watch.close()

    asyncio.run(main())
    assert [event for event in seen if event[0] == "ID.bsmtp"] == [("ID.bsmtp", True)]
