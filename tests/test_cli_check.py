"""``spoolsmtp check`` as a user runs it: output format and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoolsmtp", "check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def test_good_file_exits_zero(tmp_path: Path) -> None:
    (tmp_path / "ok.bsmtp").write_text(
        "HELO h\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.org>\nDATA\nhi\n.\nQUIT\n"
    )
    result = run("ok.bsmtp", cwd=tmp_path)
    assert result.returncode == 0
    assert "050 RCPT TO:<b@example.org>" in result.stdout
    assert result.stdout.rstrip().endswith(
        "ok.bsmtp: OK, 1 transaction(s), 1 recipient(s) accepted"
    )


def test_errors_name_file_line_and_reply(tmp_path: Path) -> None:
    lines = ["HELO h"] + ["NOOP"] * 12 + ["MAIL FROM:<a@example.com>", "RCPT TO:<bad address>"]
    (tmp_path / "nightly.bsmtp").write_text("\n".join([*lines, "RSET", "QUIT"]) + "\n")
    result = run("nightly.bsmtp", cwd=tmp_path)
    assert result.returncode == 65
    assert "nightly.bsmtp:15: 501 5.1.3 bad recipient address syntax" in result.stdout


def test_missing_file_exits_66_and_others_are_still_checked(tmp_path: Path) -> None:
    (tmp_path / "ok.bsmtp").write_text("HELO h\nQUIT\n")
    result = run("nope.bsmtp", "ok.bsmtp", cwd=tmp_path)
    assert result.returncode == 66
    assert "nope.bsmtp: no such file" in result.stderr
    assert "ok.bsmtp: OK" in result.stdout


def test_not_an_envelope_is_rejected_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "img.bsmtp").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    result = run("img.bsmtp", cwd=tmp_path)
    assert result.returncode == 65
    assert "img.bsmtp:1: binary content" in result.stdout
    assert "REJECTED" in result.stdout


def test_nothing_check_prints_reaches_the_terminal_as_a_control_character(tmp_path: Path) -> None:
    # a file name with ESC, BEL and a byte that is not UTF-8; a command with DEL and C1 CSI
    name = b"evil\x1b]0;owned\x07\xff.bsmtp"
    body = "HELO h\nNOOP \x7f\u009b31m\nFROB\u009b2J\nQUIT\n".encode()
    (tmp_path / name.decode("utf-8", "surrogateescape")).write_bytes(body)
    (tmp_path / "gone\x1b[2J.bsmtp").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "spoolsmtp", "check", name, b"gone\x1b[2J.bsmtp", b"nope\x1b"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 66
    assert [b for b in out if (b < 0x20 and b not in b"\n\t") or b == 0x7F] == []
    assert "\u009b" not in out.decode("utf-8")
    text = out.decode()
    assert "evil\\x1b]0;owned\\x07\\xff.bsmtp:3: 500 5.5.2 command unrecognized" in text
    assert "050 NOOP \\x7f\\x9b31m" in text
    assert "gone\\x1b[2J.bsmtp: is a directory" in text
    assert "nope\\x1b: no such file" in text
