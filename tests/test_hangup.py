"""SIGHUP reads the configuration again, as RELOAD does (and as Postfix's master takes it): a
worker alone and a supervisor with its delivery processes take a new smarthost for the next
envelope; a bad file changes nothing, is one line in the log, and the worker runs on. Before,
SIGHUP ended the worker (a terminal that hung up, an operator's ``kill -HUP``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import draft
from tests.smtpservers import SmtpServer
from tests.supervised import TWO, two_children
from tests.workerproc import WorkerProcess, wait_for


@pytest.mark.parametrize("processes", [1, 2], ids=["alone", "supervised"])
def test_sighup_reloads_and_a_bad_file_changes_nothing(tmp_path: Path, processes: int) -> None:
    old, new = SmtpServer(), SmtpServer()
    settings: dict[str, Any] = {"smarthost": f"127.0.0.1:{old.port}"}
    if processes == 2:
        settings.update(TWO)
    w = WorkerProcess(tmp_path, settings).start()
    try:
        assert w.proc is not None
        kids = two_children(w) if processes == 2 else []
        good = w.config.read_text()
        w.config.write_text(good + "retry_typo: 1\n")
        os.kill(w.proc.pid, signal.SIGHUP)
        wait_for(lambda: "retry_typo" in w.log.read_text(), what="the bad file named in the log")
        w.drop_drafts("before.bsmtp", [draft("o@example.com", ["a@example.org"])])
        wait_for(lambda: w.final("before.bsmtp"), what="delivered on the old config")

        w.config.write_text(good.replace(f"127.0.0.1:{old.port}", f"127.0.0.1:{new.port}"))
        os.kill(w.proc.pid, signal.SIGHUP)
        wait_for(lambda: w.log.read_text().count("reloaded") >= 1, what="reloaded")
        w.drop_drafts("after.bsmtp", [draft("o@example.com", ["b@example.org"])])
        wait_for(lambda: w.final("after.bsmtp"), what="delivered on the new config")
        assert w.proc.poll() is None, "the worker runs on"
        if kids:
            assert two_children(w) == kids, "the delivery processes were not restarted"
    finally:
        w.kill()
        old.stop()
        new.stop()
    assert [m.rcpt_tos for m in old.messages] == [["a@example.org"]]
    assert [m.rcpt_tos for m in new.messages] == [["b@example.org"]]
    text = w.log.read_text()
    assert "Traceback" not in text
    assert sum("nothing changed" in line for line in text.splitlines()) == 1, text
