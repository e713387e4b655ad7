"""An address with a C1 control character (U+0080-U+009F) or a bidi/format character (Unicode
category Cf, e.g. U+202E) never reaches MAIL FROM, RCPT TO or the From: header: ``submit`` and
``spoolsmtp-sendmail`` refuse it with 64 in one line naming where it came from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spoolsmtp.app import cli, sendmail
from tests.forked import Main, as_user

RLO = "\u202e"  # right-to-left override: "moc.elpmaxe@nimda" shows as admin@example.com
NEL = "\x85"  # C1: next line


def _spool(tmp_path: Path) -> tuple[Path, Path]:
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"hostname: h.test\nspool:\n  path: {tmp_path / 'spool'}\n")
    return incoming, conf


def _run(tool: str, conf: Path, args: list[str], message: bytes, base: Path) -> tuple[int, str]:
    main: Main
    if tool == "submit":
        main, argv, env = cli.main, ["submit", "--config", str(conf), *args], {}
    else:
        main, argv, env = sendmail.main, ["-i", *args], {"SPOOLSMTP_CONFIG": str(conf)}
    code, _, err = as_user(main, argv, message, base, uid=os.geteuid(), gid=os.getegid(), env=env)
    return code, err.decode("utf-8", "replace")


CASES = [
    pytest.param(["-f", f"oper{NEL}@example.org", "a@example.org"], "-f", id="c1-sender"),
    pytest.param(["-f", f"{RLO}gro.elpmaxe@reper", "a@example.org"], "-f", id="bidi-sender"),
    pytest.param([f"bob{NEL}@example.org"], "bob\\x85@example.org", id="c1-recipient"),
    pytest.param([f"{RLO}bob@example.org"], "\\u202ebob@example.org", id="bidi-recipient"),
    pytest.param(["-f", "oper\u200b@example.org", "a@example.org"], "-f", id="zwsp-sender"),
]


@pytest.mark.parametrize("tool", ["submit", "sendmail"])
@pytest.mark.parametrize(("args", "named"), CASES)
def test_a_control_or_format_character_in_an_address_is_refused(
    tmp_path: Path, tool: str, args: list[str], named: str
) -> None:
    incoming, conf = _spool(tmp_path)
    code, err = _run(tool, conf, args, b"Subject: s\n\nbody\n", tmp_path)
    assert code == 64, err
    lines = err.splitlines()
    assert len(lines) == 1 and named in lines[0], lines
    assert list(incoming.iterdir()) == []


@pytest.mark.parametrize("tool", ["submit", "sendmail"])
@pytest.mark.parametrize("char", [NEL, RLO], ids=["c1", "bidi"])
def test_a_control_or_format_character_in_a_header_recipient_is_refused(
    tmp_path: Path, tool: str, char: str
) -> None:
    incoming, conf = _spool(tmp_path)
    message = f"To: bob{char}@example.org\nSubject: s\n\nbody\n".encode()
    code, err = _run(tool, conf, ["-t"], message, tmp_path)
    assert code == 64, err
    lines = err.splitlines()
    assert len(lines) == 1 and "-t" in lines[0] and f"U+{ord(char):04X}" in lines[0], lines
    assert list(incoming.iterdir()) == []


@pytest.mark.parametrize("tool", ["submit", "sendmail"])
def test_an_address_in_another_script_is_still_queued(tmp_path: Path, tool: str) -> None:
    incoming, conf = _spool(tmp_path)
    code, err = _run(
        tool, conf, ["-f", "jörg@example.org", "ĉu@例え.jp"], b"Subject: s\n\nbody\n", tmp_path
    )
    assert (code, err) == (0, "")
    (queued,) = list(incoming.iterdir())
    assert "jörg@example.org".encode() in queued.read_bytes()
