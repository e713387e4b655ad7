"""The control channel against a running worker's real socket: every command, who may use it,
and that it never gets in the way of delivery."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dnsserver import Zone, serve
from tests.helpers import draft
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import ROOT, WorkerProcess, wait_for


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A folder anyone may enter, for a socket an unprivileged process must reach."""
    path = Path(tempfile.mkdtemp(prefix="spoolsmtp-ctl-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def request(path: Path, line: str, timeout: float = 10.0) -> str:
    """One command over the real socket, as any client would send it; the raw answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(line.encode() + b"\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            text = data.decode()
            if line.upper().startswith("JSON") and text.endswith("\n"):
                break
            if text.endswith("\n.\n"):
                break
        return data.decode()


def ask(path: Path, line: str) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(request(path, f"JSON {line}"))
    return answer


def ctl(config: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoolsmtp", "ctl", "--config", str(config), *words],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture
def world(tmp_path: Path, sockdir: Path) -> Iterator[tuple[WorkerProcess, SmtpServer, Path]]:
    srv = SmtpServer(Script(rcpt={"later@example.org": "451 4.3.0 try later"}))
    sock = sockdir / "control.sock"
    w = WorkerProcess(
        tmp_path,
        {
            "smarthost": f"127.0.0.1:{srv.port}",
            "control": {"socket": str(sock), "max_connections_per_uid": 4},
            "retry": {"interval": "1h", "warning_age": "0s"},
        },
    ).start()
    yield w, srv, sock
    w.kill()
    srv.stop()


def test_help_query_stats_in_text_and_json(world: tuple[WorkerProcess, SmtpServer, Path]) -> None:
    w, _, sock = world
    w.drop_drafts("j.bsmtp", [draft("o@example.com", ["a@example.org", "later@example.org"])])
    rec = wait_for(lambda: w.in_state("j.bsmtp", "deferred"))
    text = request(sock, "help")
    assert text.startswith("200 commands:") and "QUERY DEST domain" in text
    assert text.endswith("\n.\n")
    query = ask(sock, "QUERY")
    assert query["status"] == 200
    states = query["result"]["states"]
    assert states["deferred"] == 1 and states["active"] == 0 and states["incoming"] == 0
    (key,) = query["result"]["destinations"]
    assert query["result"]["destinations"][key]["recipients"] == 1
    assert query["result"]["destinations"][key]["next_attempt"]
    assert "deferred" in request(sock, "QUEUE")
    one = ask(sock, f"QUERY {rec['id']}")
    assert one["result"]["source"] == "j.bsmtp"
    by = {r["address"]: r["status"] for r in one["result"]["transactions"][0]["recipients"]}
    assert by == {"a@example.org": "delivered", "later@example.org": "deferred"}
    dest_answer = ask(sock, "QUERY DEST example.org")
    assert [e["id"] for e in dest_answer["result"]["envelopes"]] == [rec["id"]]
    stats = ask(sock, "STATS")["result"]
    assert stats["files_taken"] == 1
    assert stats["recipients_delivered"] == 1 and stats["recipients_deferred"] == 1
    assert stats["connections_opened"] >= 1
    assert "recipients_delivered" in request(sock, "STATS")


def test_errors_are_answers_not_crashes(world: tuple[WorkerProcess, SmtpServer, Path]) -> None:
    w, _, sock = world
    assert ask(sock, "FROB")["status"] == 400
    assert ask(sock, "QUERY 20260101-000000-000000-abcdef")["status"] == 404
    for verb in ("HOLD", "RELEASE", "FLUSH"):
        unknown = ask(sock, f"{verb} 20260101-000000-000000-abcdef")
        assert unknown["status"] == 404, unknown
        assert unknown["error"] == "no queued envelope 20260101-000000-000000-abcdef"
    assert ask(sock, "QUERY no-such-id")["status"] == 400
    assert ask(sock, "TRACE SIDEWAYS")["status"] == 400
    assert ask(sock, "HOLD")["status"] == 400
    assert ask(sock, "STATS")["status"] == 200
    assert ctl(w.config, "FROB").returncode == 64
    assert ctl(w.config, "QUERY", "20260101-000000-000000-abcdef").returncode == 66
    assert ctl(w.config, "QUERY", "missing").returncode == 64
    assert ctl(w.config, "--socket", "/nonexistent/sock", "HELP").returncode == 69


def test_hold_release_flush_move_the_envelope(
    world: tuple[WorkerProcess, SmtpServer, Path],
) -> None:
    w, srv, sock = world
    w.drop_drafts("j.bsmtp", [draft("o@example.com", ["later@example.org"])])
    rec = wait_for(lambda: w.in_state("j.bsmtp", "deferred"))
    envelope = f"{rec['id']}.bsmtp"
    result = ctl(w.config, "HOLD", rec["id"])
    assert result.returncode == 0, result.stderr
    assert [p.name for p in w.files("hold")] == [envelope] and w.files("deferred") == []
    assert w.record_for("j.bsmtp")["state"] == "held"  # type: ignore[index]
    assert ask(sock, "QUERY")["result"]["states"]["held"] == 1
    assert ctl(w.config, "RELEASE", rec["id"]).returncode == 0
    wait_for(lambda: [p.name for p in w.files("deferred")] == [envelope])
    srv.script.rcpt.clear()
    assert ctl(w.config, "FLUSH", rec["id"]).returncode == 0
    done = wait_for(lambda: w.final("j.bsmtp"))
    assert done["transactions"][0]["recipients"][0]["status"] == "delivered"
    assert [m.rcpt_tos for m in srv.messages] == [["later@example.org"]]


def test_flush_dest_and_expire(world: tuple[WorkerProcess, SmtpServer, Path]) -> None:
    w, srv, sock = world
    w.drop_drafts("j.bsmtp", [draft("o@example.com", ["later@example.org"])])
    rec = wait_for(lambda: w.in_state("j.bsmtp", "deferred"))
    # the record on disk may say deferred a moment before the worker's own index does
    wait_for(lambda: ask(sock, f"QUERY {rec['id']}")["result"]["state"] == "deferred")
    srv.script.rcpt.clear()
    answer = ask(sock, "FLUSH DEST example.org")
    assert answer["result"]["scheduled"] == 1
    wait_for(lambda: w.final("j.bsmtp"))
    assert ask(sock, "EXPIRE example.org")["status"] == 200


def test_trace_session_shows_the_next_dialogue(
    world: tuple[WorkerProcess, SmtpServer, Path],
) -> None:
    w, _, sock = world
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as follower:
        follower.settimeout(20)
        follower.connect(str(sock))
        follower.sendall(b"TRACE SESSION\nFOLLOW\n")
        seen = b""
        while b"200 following" not in seen:
            seen += follower.recv(4096)
        w.drop_drafts("t.bsmtp", [draft("o@example.com", ["a@example.org"])])
        while b"> MAIL FROM:<o@example.com>" not in seen or b"< 250 2.0.0 queued" not in seen:
            chunk = follower.recv(65536)
            assert chunk, "trace stream ended"
            seen += chunk
    assert b"> RCPT TO:<a@example.org>" in seen
    assert ask(sock, "NOTRACE ALL")["result"]["tracing"] == []
    assert b"trace" in w.log.read_bytes()


def test_suspend_and_resume_taking_files(world: tuple[WorkerProcess, SmtpServer, Path]) -> None:
    w, _, sock = world
    assert ask(sock, "SUSPEND")["status"] == 200
    w.drop_drafts("s.bsmtp", [draft("o@example.com", ["a@example.org"])])
    wait_for(lambda: ask(sock, "QUERY")["result"]["states"]["incoming"] == 1)
    assert ask(sock, "QUERY")["result"]["suspended"]
    assert [p.name for p in w.files("incoming")] == ["s.bsmtp"]
    assert ask(sock, "RESUME")["status"] == 200
    wait_for(lambda: w.final("s.bsmtp"))


def test_query_counts_what_waits_in_the_folders_it_does_not_queue(
    world: tuple[WorkerProcess, SmtpServer, Path],
) -> None:
    """A file that is no envelope is rejected (with its reason beside it: not counted), a
    failure from a null sender is a dead letter, a failure a report to the sender."""
    w, srv, sock = world
    srv.script.rcpt["x@example.com"] = "550 5.1.1 no such user"
    w.drop("bad.bsmtp", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR")
    w.drop_drafts("null.bsmtp", [draft("", ["x@example.com"])])
    w.drop_drafts("fail.bsmtp", [draft("o@example.com", ["x@example.com"])])
    wait_for(lambda: all(w.final(n) for n in ("bad.bsmtp", "null.bsmtp", "fail.bsmtp")))
    states = ask(sock, "QUERY")["result"]["states"]
    assert (states["rejected"], states["deadletter"], states["bounces"]) == (1, 1, 1)
    assert states["incoming"] == 0


def test_reload_keeps_a_bad_config_out(world: tuple[WorkerProcess, SmtpServer, Path]) -> None:
    w, _, sock = world
    good = w.config.read_text()
    w.config.write_text(good + "retry_typo: 1\n")
    bad = ask(sock, "RELOAD")
    assert bad["status"] == 500 and "retry_typo" in bad["error"]
    w.config.write_text(good)
    assert ask(sock, "RELOAD")["status"] == 200
    assert ask(sock, "STATS")["status"] == 200


def test_reload_takes_a_new_smarthost_at_once(
    world: tuple[WorkerProcess, SmtpServer, Path],
) -> None:
    """Routing is read from the reloaded file for the next envelope, even for a destination
    the worker has already routed since it started."""
    w, old, sock = world
    w.drop_drafts("before.bsmtp", [draft("o@example.com", ["a@example.org"])])
    wait_for(lambda: w.final("before.bsmtp"))
    new = SmtpServer()
    try:
        text = w.config.read_text().replace(f"127.0.0.1:{old.port}", f"127.0.0.1:{new.port}")
        w.config.write_text(text)
        assert ask(sock, "RELOAD")["status"] == 200
        w.drop_drafts("after.bsmtp", [draft("o@example.com", ["b@example.org"])])
        wait_for(lambda: w.final("after.bsmtp"))
    finally:
        new.stop()
    assert [m.rcpt_tos for m in old.messages] == [["a@example.org"]]
    assert [m.rcpt_tos for m in new.messages] == [["b@example.org"]]


def test_reload_applies_dns_settings_and_names_the_keys_that_need_a_restart(
    tmp_path: Path, sockdir: Path
) -> None:
    """A live key (dns.allow_loopback: the resolver is built again, its cache dropped) takes
    effect for the next envelope; a key that needs a restart (control.max_line) is named in
    the answer and keeps its old value meanwhile."""
    zone = Zone()
    zone.add("example.org", "MX", "10 mx.example.org.")
    zone.add("mx.example.org", "A", "127.0.0.1")
    srv = SmtpServer()
    sock = sockdir / "control.sock"
    with serve(zone) as dns_port:
        w = WorkerProcess(
            tmp_path,
            {
                "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "allow_loopback": False},
                "delivery": {"port": srv.port},
                "control": {"socket": str(sock)},
            },
        ).start()
        try:
            w.drop_drafts("before.bsmtp", [draft("o@example.com", ["a@example.org"])])
            before = wait_for(lambda: w.final("before.bsmtp"))
            assert before["transactions"][0]["recipients"][0]["reply"]["code"] == 554
            text = w.config.read_text().replace("allow_loopback: false", "allow_loopback: true")
            w.config.write_text(text.replace("control:\n", "control:\n  max_line: 100000\n"))
            answer = ask(sock, "RELOAD")
            assert answer["status"] == 200
            assert answer["result"]["changed"] == ["control.max_line", "dns.allow_loopback"]
            assert answer["result"]["restart_needed"] == ["control.max_line"]
            said = request(sock, "RELOAD").splitlines()[0]
            assert said.endswith("reloaded; needs a restart to take effect: control.max_line")
            w.drop_drafts("after.bsmtp", [draft("o@example.com", ["b@example.org"])])
            after = wait_for(lambda: w.final("after.bsmtp"))
            assert after["transactions"][0]["recipients"][0]["status"] == "delivered"
            long = request(sock, "QUERY " + "x" * 10000)
            assert long.startswith("400 request line longer than 4096 octets")
        finally:
            w.kill()
            srv.stop()
    assert [m.rcpt_tos for m in srv.messages] == [["b@example.org"]]


def test_shutdown_drains_and_exits_zero(world: tuple[WorkerProcess, SmtpServer, Path]) -> None:
    w, _, sock = world
    assert ctl(w.config, "SHUTDOWN").returncode == 0
    assert w.wait_exit() == 0
    assert not sock.exists()
    assert ctl(w.config, "HELP").returncode == 69


def _as_nobody(sock: Path, lines: list[str]) -> list[dict[str, Any]]:
    """Fork, drop to nobody, send each line as JSON; the answers come back through a pipe."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            answers = [request(sock, f"JSON {line}") for line in lines]
            os.write(write_end, json.dumps(answers).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return [json.loads(a) for a in json.loads(data)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_an_unprivileged_user_may_look_but_not_touch(
    world: tuple[WorkerProcess, SmtpServer, Path],
) -> None:
    w, _, sock = world
    w.drop_drafts("j.bsmtp", [draft("o@example.com", ["later@example.org"])])
    rec = wait_for(lambda: w.in_state("j.bsmtp", "deferred"))
    answers = _as_nobody(
        sock, ["HELP", "QUERY", "STATS", f"HOLD {rec['id']}", "TRACE ALL", "SHUTDOWN", "FLUSH"]
    )
    assert [a["status"] for a in answers] == [200, 200, 200, 403, 403, 403, 403]
    assert "you are uid" in answers[3]["error"]
    assert [p.name for p in w.files("deferred")] == [f"{rec['id']}.bsmtp"]
    assert ask(sock, "TRACE STATUS")["result"]["tracing"] == []
    assert w.proc is not None and w.proc.poll() is None
    log = w.log.read_text()
    assert f"uid {pwd.getpwnam('nobody').pw_uid}" in log and "refused" in log


def test_floods_and_huge_lines_do_not_stop_delivery(
    world: tuple[WorkerProcess, SmtpServer, Path],
) -> None:
    w, _, sock = world
    held = []
    for _ in range(6):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(sock))
        held.append(s)
    extra = held[-1].recv(1024)
    assert extra.startswith(b"503 too many connections")
    for s in held:
        s.close()
    wait_for(lambda: request(sock, "STATS").startswith("200"), what="connections released")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as big:
        big.settimeout(10)
        big.connect(str(sock))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            big.sendall(b"QUERY " + b"x" * (1024 * 1024) + b"\n")
        assert big.recv(1024).startswith(b"400 request line longer")
    w.drop_drafts("after.bsmtp", [draft("o@example.com", ["a@example.org"])])
    wait_for(lambda: w.final("after.bsmtp"))
    assert ask(sock, "STATS")["status"] == 200


def test_query_answers_while_a_destination_hangs_and_mail_is_in_flight(
    tmp_path: Path, sockdir: Path
) -> None:
    stuck = SmtpServer(Script(data_delay=30.0))
    fast = SmtpServer()
    sock = sockdir / "control.sock"
    w = WorkerProcess(
        tmp_path,
        {
            "routes": {
                "stuck.example": f"127.0.0.1:{stuck.port}",
                "fast.example": f"127.0.0.1:{fast.port}",
            },
            "control": {"socket": str(sock)},
            "delivery": {"timeouts": {"data_end": "60s"}},
            "shutdown_timeout": "1s",
        },
    ).start()
    try:
        w.drop_drafts("stuck.bsmtp", [draft("o@example.com", ["s@stuck.example"])])
        for i in range(1000):
            w.drop_drafts(f"f{i:04d}.bsmtp", [draft("o@example.com", [f"r{i}@fast.example"])])
        wait_for(lambda: stuck.connections >= 1)
        answered = 0
        while len(w.files("done")) < 1000:
            started = time.monotonic()
            answer = json.loads(request(sock, "JSON QUERY", timeout=5.0))
            assert answer["status"] == 200
            answered += 1
            assert time.monotonic() - started < 5.0
        assert answered >= 1
        final = ask(sock, "QUERY")["result"]
        assert final["states"]["active"] == 1
    finally:
        w.kill()
        stuck.stop()
        fast.stop()
