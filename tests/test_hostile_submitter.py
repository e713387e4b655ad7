"""A local user who may write into incoming/ (a site's 1777 folder) and nothing else of the
spool gets nothing from the worker: no file it cannot read, no hung worker, no report of
someone else's, no change to what the worker sends after it checked it. The hostile parts run
as the real unprivileged user ``nobody``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import textwrap
import threading
from pathlib import Path

from spoolsmtp.bsmtp import writer
from spoolsmtp.spool.folders import new_id
from tests.helpers import draft
from tests.hostile import (
    PLAIN_PYTHON,
    needs_root,
    nobody,
    popen_as_nobody,
    reachable_by_others,
    run_as_nobody,
)
from tests.smtpservers import Message, RawServer, Script, SmtpServer
from tests.workerproc import WorkerProcess, wait_for

SECRET = b"root-only secret 7f3a9c"
# a Python nobody may run (this test's own may live under a folder only root may enter)
LEGACY = {"strip_trailing_blanks": True}


async def dialogue(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, received: list[bytes]
) -> None:
    """A minimal server that takes a message of any size, line by line."""
    writer.write(b"220 raw.test ready\r\n")
    while True:
        line = await reader.readline()
        if not line:
            return
        verb = line[:4].upper()
        if verb == b"DATA":
            writer.write(b"354 go ahead\r\n")
            await writer.drain()
            lines = []
            while (body := await reader.readline()) not in (b".\r\n", b""):
                lines.append(body)
            received.append(b"".join(lines))
            writer.write(b"250 2.0.0 ok\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            return
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()


def open_incoming(w: WorkerProcess) -> None:
    """incoming/ as a site shares it: anyone may drop files, the sticky bit as on /tmp."""
    reachable_by_others(w.spool)
    (w.spool / "incoming").chmod(0o1777)


@needs_root
def test_a_fifo_or_symlink_swapped_in_at_claim_time_neither_hangs_nor_leaks(
    tmp_path: Path,
) -> None:
    """What a submitter racing the claim leaves in active/ (the rename moves whatever is at
    the name): a FIFO, and a symlink to a file only root may read. Both are rejected, the
    worker stops on SIGTERM, and the secret is nowhere in the spool."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    srv = SmtpServer()
    settings = {"smarthost": f"127.0.0.1:{srv.port}", "spool": LEGACY}
    w = WorkerProcess(tmp_path, settings)
    active = w.spool / "active"
    active.mkdir(parents=True)
    fifo_id, link_id = new_id(), new_id()
    os.mkfifo(active / f"{fifo_id}.orig")
    (active / f"{link_id}.orig").symlink_to(secret)
    try:
        w.start()
        fifo = wait_for(lambda: w.final(f"{fifo_id}.bsmtp"), what="fifo rejected")
        link = wait_for(lambda: w.final(f"{link_id}.bsmtp"), what="link rejected")
        w.drop_drafts("after.bsmtp", [draft("o@example.com", ["a@example.org"])])
        after = wait_for(lambda: w.final("after.bsmtp"))
    finally:
        code = w.stop(timeout=30)
        srv.stop()
    assert code == 0
    assert fifo["state"] == link["state"] == "rejected"
    assert after["state"] == "done"
    for path in w.spool.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET not in path.read_bytes(), path
    assert all(SECRET not in m.content for m in srv.messages)


PLANT = textwrap.dedent(
    """
    import os, sys
    path = sys.argv[1]
    if sys.argv[2] == "file":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        os.fchmod(fd, 0o666)
    else:
        target = path + ".target"
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        os.symlink(target, path)
    print("planted", flush=True)
    sys.stdin.readline()  # the test says when the worker is done
    # what the worker wrote where we could read it, and a recipient added for it to mail
    data = os.pread(fd, 1 << 20, 0)
    os.write(fd, b"RCPT TO:<thief@example.org>\\r\\n")
    sys.stdout.write(data.hex() + "\\n")
    """
)


@needs_root
def test_a_planted_temp_file_or_symlink_in_incoming_gets_no_requeued_report(
    tmp_path: Path,
) -> None:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    w = WorkerProcess(
        tmp_path, {"smarthost": f"127.0.0.1:{srv.port}", "bounces": {"requeue": True}}
    )
    w.start()
    open_incoming(w)
    envelope_id = new_id()
    assert w.proc is not None
    # the temp names the worker used to write the two reports under: predictable from the id
    # (a submitter who names its file ID.bsmtp chooses it) and the worker's pid
    planted = []
    try:
        for kind, tx in (("file", 1), ("link", 2)):
            name = f".{envelope_id}.{tx}.ndr.bsmtp.{w.proc.pid}.tmp"
            proc = popen_as_nobody(
                [PLAIN_PYTHON, "-c", PLANT, str(w.spool / "incoming" / name), kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            assert proc.stdout.readline() == "planted\n"
            planted.append(proc)
        message = b"Subject: victim's private subject\r\n\r\nhello\r\n"
        victim = draft("victim@example.com", ["gone@example.org"], message)
        w.drop_drafts(f"{envelope_id}.bsmtp", [victim, victim])
        rec = wait_for(lambda: w.final(f"{envelope_id}.bsmtp"))

        def reports() -> list[Message]:
            return [m for m in srv.messages if "victim@example.com" in m.rcpt_tos]

        wait_for(lambda: len(reports()) == 2, what="both requeued reports delivered")
        got = reports()
        read = []
        for proc in planted:
            out, _ = proc.communicate("done\n", timeout=10)
            read.append(bytes.fromhex(out.strip()))
    finally:
        for proc in planted:
            proc.kill()
            proc.wait(10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        w.stop()
        srv.stop()
    assert rec["state"] == "done"
    assert read == [b"", b""], read
    assert len(got) == 2 and all(b"victim's private subject" in m.content for m in got)
    assert all("thief@example.org" not in m.rcpt_tos for m in srv.messages)


REWRITE = textwrap.dedent(
    """
    import os, sys
    try:
        fd = os.open(sys.argv[1], os.O_WRONLY)
        os.pwrite(fd, bytes.fromhex(sys.argv[2]), int(sys.argv[3]))
        print("rewritten")
    except OSError as exc:
        print("refused:", exc)
    """
)


@needs_root
def test_a_submitter_cannot_change_what_is_sent_after_the_claim(tmp_path: Path) -> None:
    """A large file (streamed, not kept in memory) owned by the submitter is rewritten after
    the worker checked it and before it is sent: the server gets exactly what was checked."""
    connected, rewritten = threading.Event(), threading.Event()
    received: list[bytes] = []

    async def script(reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
        connected.set()
        await asyncio.get_running_loop().run_in_executor(None, rewritten.wait, 30)
        await dialogue(reader, out, received)

    srv = RawServer(script)
    # the server's greeting waits for the rewrite (a process started as nobody): time enough
    phases = ("connect", "greeting", "ehlo", "mail", "rcpt", "data", "data_block", "data_end")
    timeouts = {"timeouts": dict.fromkeys(phases, "60s")}
    w = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{srv.port}", "delivery": timeouts})
    w.start()
    open_incoming(w)
    envelope_id = new_id()
    line = b"x" * 70 + b"\r\n"
    message = b"Subject: big\r\n\r\n" + line * (300 * 1024 // len(line))
    data = writer.render([draft("o@example.com", ["a@example.org"], message)], "batch.test")
    evil = b"\r\n.\r\nRSET\r\n\x00bare\nlf"
    where = data.index(line * 2) + len(line)
    uid, gid = nobody()
    try:
        tmp = w.spool / "incoming" / f".{envelope_id}.bsmtp"
        tmp.write_bytes(data)
        os.chown(tmp, uid, gid)
        tmp.rename(w.spool / "incoming" / f"{envelope_id}.bsmtp")
        assert connected.wait(15)
        path = w.spool / "active" / f"{envelope_id}.bsmtp"
        done = run_as_nobody(
            [PLAIN_PYTHON, "-c", REWRITE, str(path), evil.hex(), str(where)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        rewritten.set()
        rec = wait_for(lambda: w.final(f"{envelope_id}.bsmtp"), timeout=60)
    finally:
        rewritten.set()
        w.stop()
        srv.stop()
    assert rec["state"] == "done", rec
    assert len(received) == 1, done.stdout
    assert received[0].endswith(message), done.stdout  # after our Received: header
