"""The outsider's measure: drop-to-delivered, counted at a C receiver, against Postfix.

A separate process (the dropper, as a batch job would) writes N envelopes into the spool's
``incoming/`` by tmp + rename; the worker (``spoolsmtp run``, fsync on) delivers them to
Postfix's ``smtp-sink``, started with ``-M N`` so that it exits on the N-th message; the clock
runs from the dropper's first rename to the sink's exit. In the same run a private Postfix
instance (its own config and queue directories under a temp folder, smtpd on a free loopback
port, ``relayhost = [127.0.0.1]:<sink>``, its default fsync) is fed the same N messages by
Postfix's ``smtp-source`` (20 sessions, ``-F`` the same message text) and timed the same way:
first connection to the sink's N-th message. Printed: envelopes/s and CPU seconds per 1,000
of each (the worker's process tree; Postfix's master and every daemon under it), and the ratios.

    .venv/bin/python scripts/bench_outsider.py [-n 10000] [--processes 1 2] [--size 2048]
                                               [--rcpts 1] [--no-postfix] [--dir PATH] [--keep]
                                               [--twins] [--set SECTION.KEY=VALUE ...]

``--dir`` puts the spools and Postfix's queue on another file system (default: the system's
temporary folder). On ext4 without a journal (this machine's disk) every file created costs a
look at each inode freed in the last 60 s (360 s while its inode table block is unwritten),
so the cleanup of one run slows the next run's file creations, Postfix's most of all (it
creates and deletes a queue file per message); ``--keep`` leaves the folders (remove them
later), and the first line printed is what creating a file cost there before the runs.
``--twins`` adds a run of two workers of one process each, each on its own spool, the dropper
writing in turn into both: two that share nothing, the ceiling for a supervisor and two
delivery processes on the same cores. ``--set delivery.max_per_destination=40`` (again for
more) sets a config key for every worker run. README, Benchmarks, has the figures.

Needs Postfix's smtp-sink, smtp-source and postfix (Debian: apt-get install postfix); only
127.0.0.1 is used. Run as root (Postfix's daemons drop to the ``postfix`` user).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from benchkit import Mail, create_cost, free_port, own_cpu, tree_cpu, tree_switches

from spoolsmtp.spool.folders import FOLDERS as FOLDER_NAMES

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("smtp-sink", "smtp-source", "postfix")
SESSIONS = 20  # smtp-source's sessions, as the worker's delivery.max_per_destination
# not for --set (nor their sections whole, nor where a spool folder is: the dropper writes there)
FIXED = ("worker.processes", "spool.path", "smarthost", "hostname")
FOLDERS = frozenset(FOLDER_NAMES)


def _which(name: str) -> str | None:
    """Postfix's tools are in /usr/sbin, often not on a user's PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def tool(name: str) -> str:
    found = _which(name)
    assert found is not None
    return found


def missing_tool(name: str) -> bool:
    return _which(name) is None


def missing() -> list[str]:
    return [t for t in TOOLS if missing_tool(t)]


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None = None, deadline: float = 30.0
) -> None:
    """Until something (``proc``) listens on ``port``; the run stopped (``proc`` killed) if
    nothing does."""
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end or (proc is not None and proc.poll() is not None):
                if proc is not None:
                    proc.kill()
                    proc.wait()
                sys.exit(f"bench_outsider: nothing listens on 127.0.0.1:{port}")
            time.sleep(0.05)


class Sink:
    """smtp-sink, which exits on the N-th message (``end()`` is when it did), or with ``n``
    None runs until ``stop()``."""

    def __init__(self, n: int | None) -> None:
        self.port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        count = [] if n is None else ["-M", str(n)]
        self.proc = subprocess.Popen(
            [tool("smtp-sink"), *user, *count, f"127.0.0.1:{self.port}", "256"],
            stdout=subprocess.DEVNULL,
        )
        wait_listening(self.port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def end(self, timeout: float) -> float:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            sys.exit("bench_outsider: smtp-sink did not get every message in time")
        return time.time()


def drop(incomings: list[str], n: int, size: int, rcpts: int) -> None:
    """The dropper (its own process): every envelope rendered first, then written by tmp +
    rename one after another, in turn into each of ``incomings``; prints the time of the first
    rename."""
    mail = Mail(size, rcpts)
    data = [mail.envelope(i) for i in range(n)]
    first = 0.0
    for i, body in enumerate(data):
        incoming = incomings[i % len(incomings)]
        tmp = os.path.join(incoming, f".b{i:06d}.bsmtp")
        with open(tmp, "wb") as fh:
            fh.write(body)
        os.rename(tmp, os.path.join(incoming, f"b{i:06d}.bsmtp"))
        first = first or time.time()
    print(f"FIRST {first:.6f}", flush=True)


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set section.key=value`` (the value read as YAML) as nested config sections."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"bench_outsider: --set {pair!r}: expected section.key=value")
        parents = {f.partition(".")[0] for f in FIXED}
        section, _, name = key.partition(".")
        if key in FIXED or key in parents or (section == "spool" and name in FOLDERS):
            sys.exit(f"bench_outsider: --set {key}: the harness sets it")
        *path, last = key.split(".")
        place = out
        for part in path:
            place = place.setdefault(part, {})
            if not isinstance(place, dict):
                sys.exit(f"bench_outsider: --set {pair!r}: {part} is set to a value already")
        place[last] = yaml.safe_load(value)
    return out


def merged(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in more.items():
        inner = out.get(key)
        fits = isinstance(inner, dict) and isinstance(value, dict)
        out[key] = merged(inner, value) if fits and inner is not None else value
    return out


def spoolsmtp_run(
    tmp: Path,
    n: int,
    processes: int,
    mail: Mail,
    timeout: float,
    more: dict[str, Any],
    workers: int = 1,
) -> tuple[float, float, float, float]:
    """``workers`` workers (each ``processes`` delivery processes, its own spool: with two, the
    ceiling of two that share nothing) fed by the dropper: env/s, CPU s/1000, the part of that
    CPU the top processes spent themselves (the supervisor, with processes > 1), and the
    workers' context switches per envelope."""
    sink = Sink(n)
    started: list[subprocess.Popen[bytes]] = []
    incomings = []
    try:
        for k in range(workers):
            spool = tmp / ("spool" if workers == 1 else f"spool{k}")
            (spool / "incoming").mkdir(parents=True)
            incomings.append(str(spool / "incoming"))
            conf = {
                "hostname": "bench.example",
                "smarthost": f"127.0.0.1:{sink.port}",
                "log_level": "warning",
                "spool": {"path": str(spool)},
                "worker": {"processes": processes},
            }
            config = tmp / ("conf.yaml" if workers == 1 else f"conf{k}.yaml")
            config.write_text(yaml.safe_dump(merged(conf, more)))
            command = [sys.executable, "-m", "spoolsmtp", "run", "--config", str(config)]
            started.append(subprocess.Popen(command, cwd=ROOT))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            (Path(i).parent / "active").exists() for i in incomings
        ):
            time.sleep(0.1)
        time.sleep(1.0 + processes * 0.5)  # started and watching
        pids = [w.pid for w in started]
        cpu0, own0 = sum(map(tree_cpu, pids)), sum(map(own_cpu, pids))
        cs0 = sum(map(tree_switches, pids))
        dropper = subprocess.run(
            [sys.executable, __file__, "drop", str(n), *mail.args(), *incomings],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        first = float(dropper.stdout.split()[1])
        end = sink.end(timeout)
        cpu = sum(map(tree_cpu, pids)) - cpu0
        own = sum(map(own_cpu, pids)) - own0
        switches = sum(map(tree_switches, pids)) - cs0
    finally:
        for worker in started:
            worker.send_signal(signal.SIGTERM)
        for worker in started:
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                print(f"bench_outsider: {worker.pid} ignored SIGTERM; killed", file=sys.stderr)
                worker.kill()
                worker.wait()
        if sink.proc.poll() is None:
            sink.proc.kill()
    return n / (end - first), cpu / n * 1000, own / n * 1000, switches / n


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.example
mydomain = bench.example
myorigin = bench.example
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink}
smtp_dns_support_level = disabled
alias_maps =
alias_database =
local_recipient_maps =
smtpd_tls_security_level = none
smtp_tls_security_level = none
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
"""


class Postfix:
    """A private Postfix instance in ``dir``: smtpd on a free loopback port."""

    def __init__(self, dir: Path, sink_port: int) -> None:
        self.dir = dir
        self.etc = dir / "etc"
        self.etc.mkdir(parents=True)
        for sub in ("queue", "data"):
            (dir / sub).mkdir()
        shutil.chown(dir / "data", "postfix")
        self.port = free_port()
        (self.etc / "main.cf").write_text(MAIN_CF.format(dir=dir, sink=sink_port))
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if fields and not line[0].isspace() and not line.startswith("#"):
                if fields[:2] == ["smtp", "inet"]:
                    fields[0] = f"127.0.0.1:{self.port}"
                if len(fields) > 4:
                    fields[4] = "n"  # no chroot: this instance has no chroot tree
                lines.append(" ".join(fields))
            else:
                lines.append(line)
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")
        env = {**os.environ, "MAIL_CONFIG": str(self.etc)}
        self.env = env
        subprocess.run(
            [tool("postfix"), "-c", str(self.etc), "set-permissions"],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        subprocess.run(
            [tool("postfix"), "-c", str(self.etc), "start"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wait_listening(self.port)

    def master_pid(self) -> int:
        return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])

    def stop(self) -> None:
        subprocess.run(
            [tool("postfix"), "-c", str(self.etc), "stop"],
            env=self.env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def postfix_run(tmp: Path, n: int, mail: Mail, timeout: float) -> tuple[float, float]:
    """Postfix fed by smtp-source: env/s, CPU s/1000 of the master and its daemons."""
    sink = Sink(n)
    postfix = Postfix(tmp / "postfix", sink.port)
    try:
        message = tmp / "message.txt"
        message.write_bytes(mail.body.replace(b"\r\n", b"\n"))
        master = postfix.master_pid()
        time.sleep(1.0)
        cpu0 = tree_cpu(master)
        first = time.time()
        source = subprocess.Popen(
            [
                tool("smtp-source"),
                "-d",
                "-s",
                str(SESSIONS),
                "-m",
                str(n),
                "-r",
                str(mail.rcpts),
                "-F",
                str(message),
                "-f",
                "bench@example.com",
                "-t",
                "r@example.org",
                "-M",
                "bench.example",
                f"127.0.0.1:{postfix.port}",
            ],
        )
        end = sink.end(timeout)
        cpu = tree_cpu(master) - cpu0
        source.wait(60)
    finally:
        postfix.stop()
        if sink.proc.poll() is None:
            sink.proc.kill()
    return n / (end - first), cpu / n * 1000


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "drop":
        n, size, rcpts = map(int, sys.argv[2:5])
        drop(sys.argv[5:], n, size, rcpts)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=10_000, help="envelopes per run")
    parser.add_argument("--processes", type=int, nargs="+", default=[1], metavar="N")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--rcpts", type=int, default=1, help="recipients per envelope")
    parser.add_argument("--no-postfix", action="store_true", help="skip the Postfix run")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--dir", default=None, help="where the runs' folders go")
    parser.add_argument(
        "--keep", action="store_true", help="leave the runs' folders (no inodes freed)"
    )
    parser.add_argument(
        "--twins",
        action="store_true",
        help="also two workers of one process each, own spools, one dropper: the ceiling",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config setting for the workers (again for more)",
    )
    args = parser.parse_args()
    more = overrides(args.set)
    if missing():
        print(
            f"bench_outsider: needs {', '.join(missing())} from Postfix: apt-get install postfix"
            " (then stop its own service so it does not hold port 25: service postfix stop)",
            file=sys.stderr,
        )
        sys.exit(2)
    mail = Mail(args.size, args.rcpts)
    rows: list[tuple[str, float, float, float | None, float | None]] = []
    outer = tempfile.mkdtemp(prefix="spoolsmtp-outsider-", dir=args.dir)
    os.chmod(outer, 0o755)  # Postfix's daemons (user postfix) walk into their queue
    creating = create_cost(os.path.join(outer, "probe"))
    try:
        for processes in dict.fromkeys(args.processes):
            tmp = Path(outer) / f"p{processes}"
            tmp.mkdir()
            rate, cpu, own, cs = spoolsmtp_run(tmp, args.n, processes, mail, args.timeout, more)
            rows.append((f"spoolsmtp, processes {processes}", rate, cpu, own, cs))
        if args.twins:
            tmp = Path(outer) / "twins"
            tmp.mkdir()
            rate, cpu, _, cs = spoolsmtp_run(tmp, args.n, 1, mail, args.timeout, more, 2)
            rows.append(("spoolsmtp, 2 workers, own spools", rate, cpu, None, cs))
        if not args.no_postfix:
            rate, cpu = postfix_run(Path(outer), args.n, mail, args.timeout)
            rows.append(("Postfix smtpd -> queue -> smtp", rate, cpu, None, None))
    finally:
        if args.keep:  # several runs in a row: the next one's file creations pay for none
            print(f"kept {outer}")
        else:
            shutil.rmtree(outer, ignore_errors=True)
    print(f"N={args.n}, {mail}; drop (or first connection) to the sink's N-th message")
    print(f"creating a file in {outer}: {creating:.0f} us CPU (before the runs)")
    # "top": of the CPU, what the top process spent itself (with processes > 1: the supervisor);
    # "cs/env": the worker's context switches per envelope (every thread of every process)
    head = (
        f"{'path':34} {'env/s':>7} {'CPU s/1000':>10} {'top':>5} {'cs/env':>6}"
        f" {'x first':>8} {'x Postfix':>9}"
    )
    print(head)
    postfix = rows[-1][1] if not args.no_postfix else None
    for label, rate, cpu, by_top, per_env in rows:
        vs_pf = f"{rate / postfix:9.2f}" if postfix else "        -"
        top = f"{by_top:5.2f}" if by_top is not None else "    -"
        switches = f"{per_env:6.2f}" if per_env is not None else "     -"
        print(
            f"{label:34} {rate:7.0f} {cpu:10.2f} {top} {switches} {rate / rows[0][1]:8.2f} {vs_pf}"
        )


if __name__ == "__main__":
    main()
