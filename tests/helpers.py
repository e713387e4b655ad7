"""Shared test helpers: configs built from plain dicts, envelopes written with the real writer."""

from __future__ import annotations

import email
import sys
from pathlib import Path
from typing import Any

import yaml
from flufl.bounce import all_failures

from spoolsmtp.bsmtp import writer
from spoolsmtp.bsmtp.reader import Reader
from spoolsmtp.model import config
from spoolsmtp.model.envelope import Envelope, MailParams, Recipient
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.spool import envfile

SENDMAIL = Path(sys.executable).with_name("spoolsmtp-sendmail")

FAST_TIMEOUTS = {
    "connect": "2s",
    "greeting": "2s",
    "ehlo": "2s",
    "starttls": "2s",
    "mail": "2s",
    "rcpt": "2s",
    "data": "2s",
    "data_block": "2s",
    "data_end": "2s",
    "quit": "1s",
}


def make_config(**sections: Any) -> config.Config:
    """A config from keyword sections, as YAML would give them; fast timeouts by default."""
    data: dict[str, Any] = {"hostname": "spoolsmtp.test", **sections}
    delivery = data.setdefault("delivery", {})
    delivery.setdefault("timeouts", dict(FAST_TIMEOUTS))
    return config.parse(yaml.safe_dump(data), "test.yaml")


def draft(
    sender: str,
    recipients: list[str],
    message: bytes = b"Subject: test\r\n\r\nhello\r\n",
    params: MailParams | None = None,
) -> writer.Draft:
    return writer.Draft(
        sender, tuple(Recipient(r) for r in recipients), message, params or MailParams()
    )


def write_envelope(
    path: Path, drafts: list[writer.Draft], cfg: config.Config | None = None
) -> Envelope:
    cfg = cfg or config.Config(hostname="spoolsmtp.test")
    path.write_bytes(writer.render(drafts, "batch.test"))
    env = envfile.read(path, cfg.limits, cfg.helo_name)
    assert env.accepted, env.errors
    return env


def read_in_steps(
    data: bytes, step: int, limits: config.Limits, max_file_bytes: int | None = None
) -> Envelope | str:
    """Feed the reader ``step`` bytes at a time: the envelope, or the fault as text."""
    reader = Reader("steps", limits, "mx.test", max_file_bytes)
    try:
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
        return reader.finish()
    except EnvelopeFault as exc:
        return str(exc)


def report_failures(path: Path) -> tuple[set[str], set[str]]:
    """Read a report envelope as a bounce processor would: (delayed, failed) addresses."""
    cfg = config.Config()
    env = envfile.read(path, cfg.limits, "x")
    message = email.message_from_bytes(envfile.message_bytes(path, env.transactions[0].message))
    temporary, permanent = all_failures(message)
    return {a.decode() for a in temporary}, {a.decode() for a in permanent}


def statuses(rec: dict[str, Any]) -> dict[str, str]:
    """Each recipient's status in a result record, by address."""
    return {r["address"]: r["status"] for t in rec["transactions"] for r in t["recipients"]}
