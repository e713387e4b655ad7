"""What cron, mail(1) and PHP hand to ``spoolsmtp-sendmail`` / ``submit`` arrives as they meant it:
body-only messages, sendmail's getopt, unqualified addresses, and flag values that try to inject
envelope commands or headers."""

from __future__ import annotations

import email
import email.header
import email.policy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spoolsmtp.bsmtp.compose import qualify_field
from tests.helpers import SENDMAIL
from tests.workerproc import ROOT


class Spool:
    """A spool with a config (absolute paths) and no worker: what the entry points wrote."""

    def __init__(self, root: Path, extra: str = "") -> None:
        self.root = root
        self.incoming = root / "spool" / "incoming"
        self.incoming.mkdir(parents=True)
        self.config = root / "conf.yaml"
        self.config.write_text(f"hostname: h.test\nspool:\n  path: {root}/spool\n{extra}")

    def sendmail(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SPOOLSMTP_CONFIG": str(self.config)}
        return subprocess.run(
            [str(SENDMAIL), *args],
            cwd=self.root,
            input=stdin,
            capture_output=True,
            check=False,
            timeout=60,
            env=env,
        )

    def submit(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "spoolsmtp", "submit", "--config", str(self.config), *args]
        return subprocess.run(
            argv, cwd=self.root, input=stdin, capture_output=True, check=False, timeout=60, env=env
        )

    def envelopes(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.incoming.iterdir())]

    def only(self) -> bytes:
        (data,) = self.envelopes()
        return data


def commands(envelope: bytes) -> list[str]:
    """The command lines of a one-transaction envelope (the message left out)."""
    head, _, rest = envelope.partition(b"\r\nDATA\r\n")
    _, _, tail = rest.partition(b"\r\n.\r\n")
    return (head + b"\r\nDATA\r\n" + tail).decode().split("\r\n")


def message_of(envelope: bytes) -> bytes:
    """The message of a one-transaction envelope, unstuffed."""
    _, _, rest = envelope.partition(b"\r\nDATA\r\n")
    text, _, _ = rest.partition(b"\r\n.\r\n")
    lines = [line[1:] if line.startswith(b".") else line for line in text.split(b"\r\n")]
    return b"\r\n".join(lines) + b"\r\n"


def parsed(envelope: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(message_of(envelope), policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


# -- item 7: a body-only message keeps its body --------------------------------------------


@pytest.mark.parametrize(
    ("text", "headers", "body"),
    [
        (b"Hello world\nsecond line\n\nparagraph 2\n", {}, "Hello world\r\nsecond line\r\n"),
        (b"Hello: world\n\nthe body\n", {"Hello": "world"}, "the body\r\n"),
        (b"\nSubject: not a header\n", {}, "Subject: not a header\r\n"),
        (b"Subject: s\nthis line is text\n", {"Subject": "s"}, "this line is text\r\n"),
        (b"Subject: s\n folded\n\nbody\n", {"Subject": "s folded"}, "body\r\n"),
        (b"X-A: 1\n--boundary: x\n", {"X-A": "1"}, "--boundary: x\r\n"),
    ],
)
def test_a_body_only_message_gets_the_blank_line_after_our_headers(
    tmp_path: Path, text: bytes, headers: dict[str, str], body: str
) -> None:
    spool = Spool(tmp_path)
    done = spool.sendmail("alice@example.org", stdin=text)
    assert done.returncode == 0, done.stderr
    raw = message_of(spool.only())
    _, _, rest = raw.partition(b"\r\n\r\n")
    assert rest.decode().startswith(body), raw
    msg = parsed(spool.only())
    assert not msg.defects, msg.defects
    assert set(msg.keys()) == {*headers, "From", "Date", "Message-ID"}
    for name, value in headers.items():
        assert msg[name] == value


def test_echo_into_submit_keeps_the_first_paragraph_in_the_body(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    done = spool.submit("-f", "job@example.com", "a@example.org", stdin=b"disk 91% full\n")
    assert done.returncode == 0, done.stderr
    assert message_of(spool.only()).endswith(b"\r\n\r\ndisk 91% full\r\n")


# -- item 8: sendmail's getopt ------------------------------------------------------------


LONE_DOT = b"Subject: s\nTo: alice@example.org\n\nbefore\n.\nafter the dot\n"


@pytest.mark.parametrize(
    "flags", [["-ti"], ["-it"], ["-t", "-oi"], ["-oi", "-t"], ["-tOIgnoreDots"]]
)
def test_clustered_flags_mean_what_sendmail_means(tmp_path: Path, flags: list[str]) -> None:
    spool = Spool(tmp_path)
    done = spool.sendmail(*flags, stdin=LONE_DOT)
    assert done.returncode == 0, done.stderr
    data = spool.only()
    assert "RCPT TO:<alice@example.org>" in commands(data)
    assert b"after the dot" in message_of(data)


@pytest.mark.parametrize(
    "args",
    [
        ["-O", "DeliveryMode=b", "alice@example.org"],
        ["-ODeliveryMode=b", "alice@example.org"],
        ["-oem", "-odb", "alice@example.org"],
        ["-o", "em", "alice@example.org"],
        ["-B", "8BITMIME", "-h", "5", "alice@example.org"],
        ["-L", "label", "-X", "/tmp/log", "-C", "/etc/mail/sendmail.cf", "alice@example.org"],
        ["alice@example.org", "-oi"],
        ["-fjob@example.com", "-FJob", "--", "alice@example.org"],
    ],
)
def test_option_values_are_never_recipients(tmp_path: Path, args: list[str]) -> None:
    spool = Spool(tmp_path)
    done = spool.sendmail(*args, stdin=b"Subject: s\n\nbody\n")
    assert done.returncode == 0, done.stderr
    rcpts = [c for c in commands(spool.only()) if c.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<alice@example.org>"]


def test_f_glued_or_apart_sets_the_sender_and_dashdash_ends_options(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    done = spool.sendmail("-f", "job@example.com", "--", "-oi", stdin=b"x\n.\nafter\n")
    assert done.returncode == 0, done.stderr
    data = spool.only()
    assert "RCPT TO:<-oi@h.test>" in commands(data), "after --, -oi is a recipient"
    assert b"after" not in message_of(data)
    (spool.incoming / next(spool.incoming.iterdir()).name).unlink()
    done = spool.sendmail("-tfjob@example.com", stdin=b"To: a@example.org\n\nx\n")
    assert done.returncode == 0, done.stderr
    assert "MAIL FROM:<job@example.com>" in commands(spool.only())


@pytest.mark.parametrize("args", [["-k", "a@example.org"], ["-f"], ["-bp"], ["-q"], ["-q1h"]])
def test_unknown_or_refused_options_exit_64_and_queue_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    spool = Spool(tmp_path)
    done = spool.sendmail(*args, stdin=b"x\n")
    assert done.returncode == 64
    assert done.stderr.startswith(b"spoolsmtp-sendmail: ")
    assert spool.envelopes() == []


# -- item 9: unqualified addresses are qualified --------------------------------------------


def test_cron_without_mailto_mails_root_at_the_local_domain(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    cron_mail = b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@h> ls\n\nout\n"
    done = spool.sendmail("-i", "-FCronDaemon", "-oem", "-oi", "-t", stdin=cron_mail)
    assert done.returncode == 0, done.stderr
    data = spool.only()
    assert "RCPT TO:<root@h.test>" in commands(data)
    msg = parsed(data)
    assert msg["To"] == "root@h.test"
    assert b"\r\nFrom: root@h.test (Cron Daemon)\r\n" in b"\r\n" + message_of(data)


def test_sender_and_recipients_are_qualified_with_qualify_domain(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "submit:\n  qualify_domain: example.net\n")
    done = spool.sendmail("-f", "batch", "ops", "alice@example.org", stdin=b"x\n")
    assert done.returncode == 0, done.stderr
    cmds = commands(spool.only())
    assert "MAIL FROM:<batch@example.net>" in cmds
    assert "RCPT TO:<ops@example.net>" in cmds and "RCPT TO:<alice@example.org>" in cmds
    done = spool.submit("-f", "batch", "ops", stdin=b"x\n")
    assert done.returncode == 0, done.stderr
    assert any(b"RCPT TO:<ops@example.net>" in e for e in spool.envelopes())


def test_errors_name_the_program_that_ran(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    done = spool.sendmail("bad address@", stdin=b"x\n")
    assert done.returncode == 64
    assert done.stderr.startswith(b"spoolsmtp-sendmail: ")
    done = spool.submit("bad address@", stdin=b"x\n")
    assert done.returncode == 64
    assert done.stderr.startswith(b"spoolsmtp submit: ")


# -- item 10: flag values cannot inject commands or headers ---------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("-V", "id1\r\nRCPT TO:<evil@example.net>"),
        ("-V", "id1 NOTIFY=NEVER"),
        ("-V", "x" * 101),
        ("-V", "caf\u00e9"),
        ("-N", "SUCCESS\r\nRCPT TO:<evil@example.net>"),
        ("-N", "NEVER,SUCCESS"),
        ("-N", "sometimes"),
        ("-R", "full\r\nRCPT TO:<evil@example.net>"),
        ("-R", "body"),
        ("-F", "Ops\nBcc: evil@example.net"),
        ("-F", "Ops\rBcc: evil@example.net"),
        ("-F", "Ops\u2028Bcc: evil@example.net"),
        ("-f", "a@example.com>\r\nRCPT TO:<evil@example.net"),
        ("-f", "a@example.com> SIZE=1"),
        ("-f", "a b@example.com"),
        ("-r", "a@example.com\nx"),
        ("-B", "8BITMIME\r\nRCPT TO:<evil@example.net>"),
    ],
)
def test_a_flag_value_that_injects_is_refused_and_nothing_is_queued(
    tmp_path: Path, flag: str, value: str
) -> None:
    spool = Spool(tmp_path)
    done = spool.sendmail(flag, value, "alice@example.org", stdin=b"Subject: s\n\nbody\n")
    assert done.returncode == 64, done.stderr
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"spoolsmtp-sendmail: {flag}"), lines
    assert spool.envelopes() == []


def test_submit_refuses_an_injecting_full_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    done = spool.submit("-F", "Ops\nBcc: evil@example.net", "a@example.org", stdin=b"x\n")
    assert done.returncode == 64
    assert b"-F" in done.stderr
    assert spool.envelopes() == []


def test_good_flag_values_arrive_encoded(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    done = spool.sendmail(
        "-V", "job+42=a", "-N", "success, failure", "-R", "hdrs", "-F", "J\u00f6rg D\u0153, Ops",
        "alice@example.org",
        stdin=b"Subject: s\n\nbody\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = spool.only()
    cmds = commands(data)
    mail = next(c for c in cmds if c.startswith("MAIL"))
    assert mail.endswith(" RET=HDRS ENVID=job+2B42+3Da")
    assert "RCPT TO:<alice@example.org> NOTIFY=FAILURE,SUCCESS" in cmds
    sender = parsed(data)["From"].addresses[0]
    assert sender.display_name == "J\u00f6rg D\u0153, Ops"
    assert b"From: =?utf-8?" in message_of(data)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"To: root\r\n", b"To: root@h.test\r\n"),
        (b"From: root (Cron Daemon)\n", b"From: root@h.test (Cron Daemon)\n"),
        (
            b'To: a@b.example, bob, "Smith, J" <js>, <>, undisclosed-recipients:;\n',
            b'To: a@b.example, bob@h.test, "Smith, J" <js@h.test>, <>, undisclosed-recipients:;\n',
        ),
        (
            b"Cc: =?utf-8?q?J=C3=B6rg?= <joerg>,\r\n  team: x, y@z.example;\n",
            b"Cc: =?utf-8?q?J=C3=B6rg?= <joerg@h.test>,\r\n  team: x@h.test, y@z.example;\n",
        ),
        (b"To: John Smith\n", b"To: John Smith\n"),
        (b'To: "q@x"\n', b'To: "q@x"@h.test\n'),
        (b"To: <@relay.example:a@b.example>\n", b"To: <@relay.example:a@b.example>\n"),
    ],
)
def test_header_addresses_are_qualified_and_nothing_else_changes(
    field: bytes, expected: bytes
) -> None:
    assert qualify_field(field, "h.test") == expected
