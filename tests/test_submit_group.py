"""Submitting as an ordinary user (``submit.group``): a real unprivileged uid (``nobody``) in
a group made for the test drops a message with ``spoolsmtp submit --wait`` and reads its own
result record; without the group it cannot; no member can list the drop box or the records."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile import become_nobody, cli_as_nobody, needs_root, nobody, reachable_by_others
from tests.smtpservers import SmtpServer
from tests.workerproc import WorkerProcess, wait_for

pytestmark = needs_root
MESSAGE = b"Subject: from a batch user\n\nhello\n"


@pytest.fixture
def submitters() -> Iterator[tuple[str, int]]:
    """A group made for the test (name, gid); removed afterwards."""
    name = f"spsub{os.getpid() % 100000}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def _worker(root: Path, server: SmtpServer, group: str) -> WorkerProcess:
    reachable_by_others(root)
    w = WorkerProcess(root, {"smarthost": f"127.0.0.1:{server.port}", "submit": {"group": group}})
    # the submitters read the config and enter the spool (whatever umask an earlier test left)
    w.config.chmod(0o644)
    w.spool.chmod(0o755)
    return w.start()


def _as_nobody(argv: list[str], groups: list[int]) -> subprocess.CompletedProcess[bytes]:
    """A plain command (cat, ls) as nobody with ``groups``."""
    return subprocess.run(
        argv, preexec_fn=lambda: become_nobody(groups), capture_output=True, check=False, timeout=30
    )


def test_a_member_of_the_group_submits_and_waits_for_its_result(
    tmp_path: Path, server: SmtpServer, submitters: tuple[str, int]
) -> None:
    name, gid = submitters
    w = _worker(tmp_path, server, name)
    try:
        incoming, results = w.spool / "incoming", w.spool / "results"
        assert (stat.S_IMODE(incoming.stat().st_mode), incoming.stat().st_gid) == (0o3730, gid)
        assert (stat.S_IMODE(results.stat().st_mode), results.stat().st_gid) == (0o2710, gid)
        argv = ["submit", "--config", str(w.config), "--wait", "60", "--json"]
        code, out, err = cli_as_nobody(
            [*argv, "-f", "batch@origin.example", "rcpt@example.org"],
            tmp_path,
            stdin=MESSAGE,
            groups=[gid],
        )
        assert code == 0, err.decode()
        record = json.loads(out)
        assert record["state"] == "done"
        assert record["transactions"][0]["recipients"][0]["status"] == "delivered"
        assert server.messages[0].rcpt_tos == ["rcpt@example.org"]
        # the record itself is the group's to read, 0640: its submitter reads it
        path = results / f"{record['id']}.json"
        info = path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, gid)
        assert json.loads(_as_nobody(["cat", str(path)], [gid]).stdout)["id"] == record["id"]
        # ... which no one outside the group can; and no member may list either folder
        assert _as_nobody(["cat", str(path)], []).returncode != 0
        for folder in (incoming, results):
            assert _as_nobody(["ls", str(folder)], [gid]).returncode != 0
    finally:
        w.stop()


def test_the_dropped_file_carries_the_group_so_a_worker_in_it_can_read_it(
    tmp_path: Path, server: SmtpServer, submitters: tuple[str, int]
) -> None:
    name, gid = submitters
    w = _worker(tmp_path, server, name)
    try:
        assert w.ask("SUSPEND")["status"] == 200  # the file stays in incoming/ to be looked at
        strict = os.umask(0o077)  # a submitter with a strict umask (the fork inherits it)
        try:
            code, out, err = cli_as_nobody(
                ["submit", "--config", str(w.config), "-f", "b@origin.example", "r@example.org"],
                tmp_path,
                stdin=MESSAGE,
                groups=[gid],
            )
        finally:
            os.umask(strict)
        assert code == 0, err.decode()
        (dropped,) = w.files("incoming")
        info = dropped.stat()
        assert (info.st_uid, info.st_gid) == (nobody()[0], gid)
        assert stat.S_IMODE(info.st_mode) == 0o640  # the group (a worker in it) reads it
        assert w.ask("RESUME")["status"] == 200
        wait_for(lambda: w.final(dropped.name), what="delivered")
        assert out.strip().decode() == dropped.name.removesuffix(".bsmtp")
    finally:
        w.stop()


def test_without_the_group_nobody_cannot_submit(
    tmp_path: Path, server: SmtpServer, submitters: tuple[str, int]
) -> None:
    name, _ = submitters
    w = _worker(tmp_path, server, name)
    try:
        code, _, err = cli_as_nobody(
            ["submit", "--config", str(w.config), "-f", "b@origin.example", "r@example.org"],
            tmp_path,
            stdin=MESSAGE,
        )
        assert code == 73 and b"cannot write into spool" in err and b"Permission denied" in err
        assert w.files("incoming") == []
    finally:
        w.stop()


def test_an_unknown_group_stops_the_worker_naming_the_key(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = WorkerProcess(
        tmp_path,
        {"smarthost": f"127.0.0.1:{server.port}", "submit": {"group": "no-such-group-here"}},
    ).start()
    assert w.wait_exit() == 78
    assert "submit.group: no group 'no-such-group-here'" in w.log.read_text()


def test_a_spool_the_group_cannot_enter_is_named_in_the_log(
    tmp_path: Path, server: SmtpServer, submitters: tuple[str, int]
) -> None:
    name, _ = submitters
    w = WorkerProcess(
        tmp_path, {"smarthost": f"127.0.0.1:{server.port}", "submit": {"group": name}}
    )
    w.spool.chmod(0o700)
    w.start()
    try:
        assert f"cannot reach {w.spool / 'incoming'}: {w.spool} is mode 0700" in w.log.read_text()
    finally:
        w.stop()
