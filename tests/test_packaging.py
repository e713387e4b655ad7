"""Packaging as an operator meets it: ``--version`` from the installed metadata, a wheel that
builds and installs into a fresh environment and runs from there, ``ctl --socket`` that needs
no config, and output commands that end quietly when their reader goes away (``| head``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from tests.smtpservers import SmtpServer
from tests.workerproc import ROOT, WorkerProcess, spoolsmtp

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(argv: Sequence[str | Path], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        argv, capture_output=True, text=True, check=False, timeout=120, env=ENV, **kw
    )


def test_version_comes_from_the_installed_metadata() -> None:
    done = _run(spoolsmtp("--version"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"spoolsmtp {metadata.version('spoolsmtp')}"


def test_help_lists_the_operators_commands_only() -> None:
    """The supervisor's internal ``child`` command is not offered (it showed as
    ``child ==SUPPRESS==``)."""
    done = _run(spoolsmtp("--help"))
    assert done.returncode == 0, done.stderr
    assert "SUPPRESS" not in done.stdout and "child" not in done.stdout, done.stdout
    for command in ("run", "deliver", "ctl", "submit", "check", "queue", "top"):
        assert f"\n    {command} " in done.stdout, done.stdout


def test_the_wheel_builds_installs_and_runs_from_a_fresh_environment(tmp_path: Path) -> None:
    # a copy of the source, so the build leaves nothing in the checkout; built offline
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "spoolsmtp", source / "spoolsmtp", ignore=shutil.ignore_patterns("*.pyc")
    )
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    built = _run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels,
         source]
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("spoolsmtp-*.whl")
    fresh = tmp_path / "fresh"
    made = _run([sys.executable, "-m", "venv", "--without-pip", fresh])
    assert made.returncode == 0, made.stderr
    python = fresh / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPOOLSMTP_CONFIG")}
    installed = subprocess.run(
        [*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        capture_output=True, text=True, check=False, timeout=120, env=clean, cwd=tmp_path,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    # the dependencies from this environment (no network here); never this checkout
    purelib = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        ).stdout.strip()
    )
    (purelib / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    version = subprocess.run(
        [fresh / "bin" / "spoolsmtp", "--version"],
        capture_output=True, text=True, check=False, timeout=60, env=clean, cwd=tmp_path,
    )  # fmt: skip
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"spoolsmtp {metadata.version('spoolsmtp')}"
    every_module = (
        "import importlib, pkgutil, spoolsmtp\n"
        f"assert spoolsmtp.__file__.startswith({str(purelib)!r}), spoolsmtp.__file__\n"
        "for m in pkgutil.walk_packages(spoolsmtp.__path__, 'spoolsmtp.'):\n"
        "    if m.name != 'spoolsmtp.__main__': importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    imported = subprocess.run(
        [python, "-c", every_module],
        capture_output=True, text=True, check=False, timeout=60, env=clean, cwd=tmp_path,
    )  # fmt: skip
    assert imported.stdout.strip() == "ok", imported.stderr
    check = subprocess.run(
        [fresh / "bin" / "spoolsmtp-sendmail", "-bv", "x@example.org"],
        capture_output=True, text=True, check=False, timeout=60, env=clean, cwd=tmp_path,
    )  # fmt: skip
    assert "Traceback" not in check.stderr


def test_ctl_with_socket_needs_no_config(tmp_path: Path, server: SmtpServer) -> None:
    w = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{server.port}"}).start()
    broken = tmp_path / "broken.yaml"
    broken.write_text("spool:\n  path: [this is not a path\n")
    try:
        done = _run(
            spoolsmtp("ctl", "--config", str(broken), "--socket", str(w.operator_socket), "STATS")
        )
        assert done.returncode == 0, done.stderr
        assert "files_taken" in done.stdout
        # with no --config at all, and $SPOOLSMTP_CONFIG naming the broken file
        done = subprocess.run(
            spoolsmtp("ctl", "--socket", str(w.operator_socket), "--json", "STATS"),
            capture_output=True, text=True, check=False, timeout=60,
            env={**ENV, "SPOOLSMTP_CONFIG": str(broken)},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert '"status": 200' in done.stdout
        # top reaches the worker the same way (found by review: it needed a good config)
        done = _run(
            spoolsmtp(
                "top", "--config", str(broken), "--socket", str(w.operator_socket),
                "--once", "--interval", "0",
            )
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "queue" in done.stdout
    finally:
        w.stop()


def _into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` with its standard output a pipe whose reader has already gone, as
    ``argv | head -1`` is once ``head`` has its line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            argv, stdout=write_end, stderr=subprocess.PIPE, check=False, timeout=60, env=ENV
        )
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_ends_quietly_as_coreutils_do(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{server.port}"}).start()
    try:
        for words in (["HELP"], ["--json", "STATS"]):
            done = _into_closed_pipe(spoolsmtp("ctl", "--socket", str(w.operator_socket), *words))
            assert done.stderr == b"", done.stderr.decode()
            assert done.returncode == -signal.SIGPIPE  # the shell shows 141, as for cat
        envelope = tmp_path / "e.bsmtp"
        envelope.write_bytes(b"HELO x\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
        done = _into_closed_pipe(spoolsmtp("check", "--config", str(w.config), str(envelope)))
        assert done.stderr == b"", done.stderr.decode()
        assert done.returncode == -signal.SIGPIPE
    finally:
        w.stop()
