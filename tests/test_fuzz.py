"""Fuzzing the parsers of untrusted input, a fixed number of examples per run (scripts/fuzz.py
runs the same targets longer, coverage-guided with atheris), and the crashes it found.

Every input gives a clean result or the module's documented error (``EnvelopeFault``,
``RemoteProtocolError``, an ``Answer``), never another exception; the reader's result does not
depend on how the bytes arrive. Crashes found become cases: envelopes in tests/corpus/fuzz/
(``NAME.bsmtp`` with the ``spoolsmtp check`` output in ``NAME.expected``, as tests/corpus/), and
control lines sent to a real worker's socket below.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings

from spoolsmtp import cli
from tests.workerproc import WorkerProcess

ROOT = Path(__file__).parent.parent
FUZZ_CORPUS = Path(__file__).parent / "corpus" / "fuzz"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz", ROOT / "scripts" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = _load()


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@_settings(400)
@given(fuzz.strategy("reader"))
def test_reader_answers_every_input_with_an_envelope_or_a_fault(data: bytes) -> None:
    fuzz.target_reader(data, chunks=False)


@_settings(400)
@given(fuzz.strategy("reader"))
def test_reader_result_does_not_depend_on_how_the_bytes_arrive(data: bytes) -> None:
    fuzz.target_reader(data)


@_settings(600)
@given(fuzz.strategy("reply"))
def test_reply_parser_and_client_protocol_answer_every_input(data: bytes) -> None:
    fuzz.target_reply(data)


CONTROL_BUGS = (
    "commands.execute lets ValueError/OSError out: QUERY DEST, FLUSH DEST and EXPIRE of a bad "
    "address literal ([x]: route.destination_for -> ipaddress), QUERY with an id over 255 "
    "octets (ENAMETOOLONG) or holding NUL (embedded null byte)"
)


@pytest.mark.xfail(strict=False, reason=CONTROL_BUGS)
@_settings(3000)
@given(fuzz.strategy("control"))
def test_every_control_line_gets_an_answer(data: bytes) -> None:
    fuzz.target_control(data)


# -- the crashes found, as cases -------------------------------------------------------------

KNOWN_READER = {
    "fuzz_bare_lf_then_nul": "reader: which fault a refused message is blamed on depends on the "
    "feed's chunking (whole file: NUL at line 6; byte by byte: bare LF at line 5, the first)",
}
READER_CASES = sorted(p.stem for p in FUZZ_CORPUS.glob("*.bsmtp"))


def _known(name: str) -> list[pytest.MarkDecorator]:
    reason = KNOWN_READER.get(name)
    return [pytest.mark.xfail(strict=False, reason=reason)] if reason else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_known(n)) for n in READER_CASES])
def test_fuzz_corpus_case(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (FUZZ_CORPUS / f"{name}.bsmtp").read_bytes()
    fuzz.target_reader(data)
    for step in (1, 7):
        assert fuzz._read(data, step) == fuzz._read(data, len(data)), step
    monkeypatch.chdir(FUZZ_CORPUS)
    code = cli.main(["check", "--config", "../spoolsmtp.yaml", f"{name}.bsmtp"])
    captured = capsys.readouterr()
    expected = (FUZZ_CORPUS / f"{name}.expected").read_text(encoding="utf-8")
    assert captured.out + captured.err + f"exit: {code}\n" == expected


@pytest.fixture(scope="module")
def dns_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, Path]]:
    """A worker routing by DNS (no smarthost: address literals are looked at), with its socket."""
    root = tmp_path_factory.mktemp("ctl")
    sock = root / "control.sock"
    settings = {"dns": {"nameservers": ["127.0.0.1"], "port": 9}, "control": {"socket": str(sock)}}
    worker = WorkerProcess(root, settings).start()
    yield worker, sock
    worker.stop()


def _ask(sock_path: Path, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        sock.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n.\n") and (chunk := sock.recv(65536)):
            data += chunk
        return data


@pytest.mark.parametrize(
    "line",
    [
        b"QUERY DEST [x]",
        b"FLUSH DEST [x]",
        b"EXPIRE [IPv6:zz]",
        b"QUERY " + b"x" * 300,
        b"QUERY a\x00b",
    ],
    ids=[
        "query-dest-literal",
        "flush-dest-literal",
        "expire-literal",
        "query-long-id",
        "query-nul",
    ],
)
@pytest.mark.xfail(strict=False, reason=CONTROL_BUGS)
def test_a_malformed_argument_gets_an_error_answer_not_a_dropped_connection(
    dns_worker: tuple[WorkerProcess, Path], line: bytes
) -> None:
    worker, sock = dns_worker
    before = worker.log.read_bytes().count(b"Traceback")
    answer = _ask(sock, line)
    assert answer[:1] == b"4", answer[:200]
    assert worker.log.read_bytes().count(b"Traceback") == before
