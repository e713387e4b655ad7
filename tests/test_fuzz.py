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
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings

from tests.workerproc import WorkerProcess, connect, exchange

ROOT = Path(__file__).parent.parent
CORPUS = Path(__file__).parent / "corpus"


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


@_settings(3000)
@given(fuzz.strategy("control"))
def test_every_control_line_gets_an_answer(data: bytes) -> None:
    fuzz.target_control(data)


# -- the crashes found, as cases -------------------------------------------------------------

# every crash the fuzzer found is a case of the corpus (tests/corpus/fuzz_*: test_corpus.py
# checks its batch response and that its reading does not depend on how the bytes arrive)
READER_CASES = sorted(p.stem for p in CORPUS.glob("fuzz_*.bsmtp"))


@pytest.mark.parametrize("name", READER_CASES)
def test_fuzz_corpus_case_keeps_the_readers_invariants(name: str) -> None:
    fuzz.target_reader((CORPUS / f"{name}.bsmtp").read_bytes())


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
    with connect(sock_path) as sock:
        return exchange(sock, line)


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
def test_a_malformed_argument_gets_an_error_answer_not_a_dropped_connection(
    dns_worker: tuple[WorkerProcess, Path], line: bytes
) -> None:
    worker, sock = dns_worker
    before = worker.log.read_bytes().count(b"Traceback")
    answer = _ask(sock, line)
    assert answer[:1] == b"4", answer[:200]
    assert worker.log.read_bytes().count(b"Traceback") == before
