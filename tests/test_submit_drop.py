"""How ``submit`` and ``spoolsmtp-sendmail`` put a message into incoming/: durable without
reading the folder (a 1733 drop box works for everyone, and a queued message is never reported
as failed), and never through a link or into a folder others may swap files in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolsmtp.app import cli, sendmail
from tests.forked import Main, as_user, open_base
from tests.hostile import needs_root
from tests.smtpservers import SmtpServer
from tests.workerproc import WorkerProcess, wait_for

MESSAGE = b"Subject: drop\n\nbody\n"


def _command(tool: str, conf: Path, *rcpts: str) -> tuple[Main, list[str], dict[str, str]]:
    """The entry point, its arguments and environment for ``tool`` with ``conf``."""
    if tool == "submit":
        return cli.main, ["submit", "--config", str(conf), *rcpts], {}
    return sendmail.main, ["-i", *rcpts], {"SPOOLSMTP_CONFIG": str(conf)}


@pytest.fixture
def base() -> Iterator[Path]:
    with open_base() as path:
        yield path


@needs_root
@pytest.mark.parametrize("tool", ["submit", "sendmail"])
def test_a_user_can_queue_into_a_1733_drop_box_once_and_it_is_delivered_once(
    base: Path, tool: str
) -> None:
    srv = SmtpServer()
    w = WorkerProcess(base, {"smarthost": f"127.0.0.1:{srv.port}"})
    try:
        incoming = w.spool / "incoming"
        incoming.chmod(0o1733)  # the mode the worker's start-up check tells operators to use
        w.spool.chmod(0o755)
        w.config.chmod(0o644)
        main, argv, env = _command(tool, w.config, "alice@example.org")
        code, out, err = as_user(main, argv, MESSAGE, base, env=env)
        assert (code, err) == (0, b"")
        queued = [p.name for p in incoming.iterdir()]
        assert len(queued) == 1 and queued[0].endswith(".bsmtp"), queued  # no temp file left
        if tool == "submit":
            assert out.decode().split() == [queued[0].removesuffix(".bsmtp")]
        w.start()
        wait_for(lambda: srv.messages, what="the message delivered")
        wait_for(lambda: w.final(queued[0]), what="the final record")
        assert w.stop() == 0
        assert len(srv.messages) == 1
        assert srv.messages[0].rcpt_tos == ["alice@example.org"]
    finally:
        w.kill()
        srv.stop()


def _spool(tmp_path: Path) -> tuple[Path, Path]:
    spool = tmp_path / "spool"
    spool.mkdir()
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"hostname: h.test\nspool:\n  path: {spool}\n")
    return spool, conf


@pytest.mark.parametrize("tool", ["submit", "sendmail"])
def test_a_symlink_at_incoming_is_refused_and_nothing_is_written_where_it_points(
    tmp_path: Path, tool: str
) -> None:
    spool, conf = _spool(tmp_path)
    elsewhere = tmp_path / "etc-cron.d"
    elsewhere.mkdir()
    (spool / "incoming").symlink_to(elsewhere)
    main, argv, env = _command(tool, conf, "alice@example.org")
    code, _, err = as_user(
        main, argv, MESSAGE, tmp_path, uid=os.geteuid(), gid=os.getegid(), env=env
    )
    assert code == 73, err
    lines = err.decode().splitlines()
    assert len(lines) == 1 and str(spool / "incoming") in lines[0], lines
    assert "link" in lines[0], lines
    assert list(elsewhere.iterdir()) == []


@needs_root
@pytest.mark.parametrize("tool", ["submit", "sendmail"])
def test_root_does_not_write_into_an_incoming_others_may_swap_files_in(
    tmp_path: Path, tool: str
) -> None:
    spool, conf = _spool(tmp_path)
    incoming = spool / "incoming"
    incoming.mkdir()
    incoming.chmod(0o777)  # writable by everyone, not sticky
    main, argv, env = _command(tool, conf, "alice@example.org")
    code, _, err = as_user(main, argv, MESSAGE, tmp_path, uid=0, gid=0, env=env)
    assert code == 73, err
    lines = err.decode().splitlines()
    assert len(lines) == 1 and str(incoming) in lines[0] and "sticky" in lines[0], lines
    assert list(incoming.iterdir()) == []
    incoming.chmod(0o1777)  # the same folder made sticky: root may queue there
    code, _, err = as_user(main, argv, MESSAGE, tmp_path, uid=0, gid=0, env=env)
    assert (code, err) == (0, b"")
    assert len(list(incoming.iterdir())) == 1
