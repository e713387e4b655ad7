"""The envelope corpus: every file's ``spoolsmtp check`` output and exit code, as reviewed."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoolsmtp.app import cli
from spoolsmtp.bsmtp import response
from spoolsmtp.model import config
from spoolsmtp.spool import envfile
from tests.helpers import read_in_steps

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(p.stem for p in CORPUS.glob("*.bsmtp"))
CFG = config.load(CORPUS / "spoolsmtp.yaml")


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len([c for c in CASES if c.startswith("smuggle_")]) == 9


@pytest.mark.parametrize("name", CASES)
def test_check_output_matches_expected(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(CORPUS)
    code = cli.main(["check", "--config", "spoolsmtp.yaml", f"{name}.bsmtp"])
    captured = capsys.readouterr()
    expected = (CORPUS / f"{name}.expected").read_text(encoding="utf-8")
    assert captured.out + captured.err + f"exit: {code}\n" == expected


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("smuggle_")])
def test_smuggled_end_of_data_never_yields_a_transaction(name: str) -> None:
    env = envfile.read(CORPUS / f"{name}.bsmtp", CFG.limits, "mx.test")
    assert env.transactions == ()
    refused = [e for e in env.response if e.echo == "."]
    assert len(refused) == 1
    assert refused[0].reply.code == 554
    assert not any("evil@" in e.echo for e in env.response)


@pytest.mark.parametrize("name", CASES)
def test_reading_does_not_depend_on_how_the_bytes_arrive(name: str) -> None:
    data = (CORPUS / f"{name}.bsmtp").read_bytes()
    limits, size = CFG.limits, CFG.spool.max_file_bytes
    whole = read_in_steps(data, max(len(data), 1), limits, size)
    assert read_in_steps(data, 1, limits, size) == whole
    assert read_in_steps(data, 7, limits, size) == whole


@pytest.mark.parametrize("name", [c for c in CASES if (CORPUS / f"{c}.reports").exists()])
def test_each_sender_is_reported_the_refusals_of_its_own_transactions(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(CORPUS)
    env = envfile.read(Path(f"{name}.bsmtp"), CFG.limits, CFG.helo_name)
    shown = []
    for tag, sender, lines in response.batch_reports(env):
        shown.append(f"{tag} <{sender}>")
        shown.extend(f"  {line}" for line in lines)
    assert "".join(line + "\n" for line in shown) == (CORPUS / f"{name}.reports").read_text()
