"""The chaos harness (scripts/chaos.py): a short real run under SIGKILL, and its ledger.

The short run is the promise itself, measured: a worker killed 15 times at random moments
while envelopes arrive and the sinks defer, refuse and answer the final dot slowly (sometimes
past the timeout) loses no recipient, delivers none twice without marking it
``possible_duplicate``, writes a report for every failed recipient, quarantines no healthy
envelope, and leaves nothing queued after one clean run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from spoolsmtp.bsmtp import writer
from spoolsmtp.model.envelope import Recipient

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "chaos.py"


def load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    """One short chaos run (about 20 s of kills, then a clean run), shared by the tests below."""
    work = tmp_path_factory.mktemp("chaos") / "run"
    # the run ends after 12 kills; the time limit is only a bound for a machine far too slow
    argv = [sys.executable, str(SCRIPT), "--kills", "12", "--seconds", "150", "--seed", "20261201"]
    argv += ["--final-seconds", "45", "--json", "--workdir", str(work)]
    run = subprocess.run(argv, capture_output=True, timeout=280, check=False)
    assert run.returncode in (0, 1), run.stderr.decode()[-2000:]
    return run.returncode, json.loads(run.stdout)


@pytest.mark.timeout(300)
def test_short_chaos_run_loses_nothing_and_duplicates_only_flagged(
    short_run: tuple[int, dict[str, Any]],
) -> None:
    _, result = short_run
    ledger = result["ledger"]
    why = json.dumps(result["examples"], indent=1)
    assert result["kills"] == 12, result["worker_exits"]
    assert result["messages_received"] > 0
    assert ledger["failed, reported"] > 0  # the sinks refuse fail-*: reports are found and read
    assert ledger["lost"] == 0, why
    assert ledger["duplicated, not flagged"] == 0, why
    assert ledger["failed, no report"] == 0, why
    assert result["records_naming_another_source"] == 0, why


@pytest.mark.timeout(300)
def test_short_chaos_run_quarantines_nothing_and_finishes_everything(
    short_run: tuple[int, dict[str, Any]],
) -> None:
    code, result = short_run
    why = json.dumps(result["examples"], indent=1)
    assert result["ledger"]["quarantined"] == 0, why  # nothing here is poison: only our kills
    assert result["ledger"]["still queued"] == 0, why
    assert result["final_run_emptied_queue"]
    assert code == 0


@pytest.mark.timeout(300)
def test_short_chaos_run_of_a_supervisor_loses_nothing(tmp_path: Path) -> None:
    """``--processes 2``: kill -9 of delivery processes and of the supervisor."""
    argv = [sys.executable, str(SCRIPT), "--kills", "8", "--seconds", "120", "--seed", "20261202"]
    argv += ["--final-seconds", "45", "--json", "--processes", "2"]
    run = subprocess.run(argv, capture_output=True, timeout=280, check=False)
    assert run.returncode in (0, 1), run.stderr.decode()[-2000:]
    result = json.loads(run.stdout)
    why = json.dumps(result["examples"], indent=1)
    exits = result["worker_exits"]
    assert result["kills"] == 8, exits
    assert exits.get("SIGKILL of a delivery process (ours)", 0) > 0, exits
    assert exits.get("SIGKILL of the supervisor (ours)", 0) > 0, exits
    for fatal in ("lost", "duplicated, not flagged", "failed, no report", "quarantined"):
        assert result["ledger"][fatal] == 0, (fatal, why)
    assert result["ledger"]["still queued"] == 0, why
    assert result["worker_log_tracebacks"] == 0
    assert run.returncode == 0


# -- the ledger itself: it must see a broken promise when there is one -------------------------


def _envelope(spool: Path, name: str, recipients: list[str]) -> None:
    body = f"Subject: t\r\nX-Chaos-Id: {name}/1\r\n\r\nhi\r\n".encode()
    draft = writer.Draft("job@batch.test", tuple(Recipient(r) for r in recipients), body)
    (spool / "done").mkdir(parents=True, exist_ok=True)
    (spool / "done" / f"ID{name}.bsmtp").write_bytes(writer.render([draft], "batch.test"))


def _record(spool: Path, name: str, statuses: dict[str, tuple[str, bool]]) -> None:
    recipients = [
        {"address": a, "status": s, "possible_duplicate": dup} for a, (s, dup) in statuses.items()
    ]
    record: dict[str, Any] = {
        "id": f"ID{name}",
        "source": name,
        "state": "done",
        "transactions": [{"number": 1, "mail_from": "job@batch.test", "recipients": recipients}],
    }
    (spool / "results").mkdir(parents=True, exist_ok=True)
    (spool / "results" / f"ID{name}.json").write_text(json.dumps(record))


def test_ledger_counts_losses_unflagged_duplicates_and_missing_reports(tmp_path: Path) -> None:
    chaos = load_chaos()
    spool = tmp_path / "spool"
    for folder in ("rejected", "bounces", "deadletter", "incoming"):
        (spool / folder).mkdir(parents=True)
    statuses = {
        "once@d.test": ("delivered", False),
        "twice@d.test": ("delivered", False),
        "flagged@d.test": ("delivered", True),
        "never@d.test": ("delivered", False),
        "fail-1@d.test": ("failed", False),
    }
    _envelope(spool, "a.bsmtp", list(statuses))
    _record(spool, "a.bsmtp", statuses)
    expected = {"a.bsmtp/1": chaos.Expected("a.bsmtp", 1, "job@batch.test", list(statuses))}
    received = [
        chaos.Received("a.bsmtp/1", ["once@d.test", "twice@d.test", "flagged@d.test"], "s0"),
        chaos.Received("a.bsmtp/1", ["twice@d.test", "flagged@d.test"], "s0"),
    ]
    result = chaos.ledger(spool, expected, received)
    assert {k: v for k, v in result["ledger"].items() if v} == {
        "delivered once": 1,
        "duplicated, not flagged": 1,
        "duplicated, flagged": 1,
        "lost": 1,
        "failed, no report": 1,
    }
