"""Whole-pipeline benchmark: envelopes dropped into incoming/ until every result is final.

The worker runs as its own process (`spoolsmtp run`) with fsync on, against a local receiver:
Postfix's smtp-sink where it is installed (a C program, so that the receiver takes little of
the cores the worker is measured on), else scripts/sink.py (``--sink`` chooses). Reported:
envelopes/s, drop-to-final latency p50/p99 (from the rename into incoming/ to the final result
record), CPU seconds per 1,000 envelopes of the worker's whole process tree (a supervisor and
its delivery processes; both hosts in the two-host mode; in the burst, from the first drop,
in the backlog, from the start) and peak RSS (the largest process's VmHWM just before the
stop). Cases:

* ``idle``: envelopes dropped one at a time, each after the previous is final (latency when idle);
* ``burst``: N envelopes dropped as fast as possible (rendered before the clock starts);
* ``backlog``: N envelopes already in incoming/ when the worker starts (time to first delivery).

Each setting of ``--processes`` (``worker.processes``) and ``--hosts`` (workers with their own
``worker.host_id`` on one spool) runs the same burst and backlog in one run, and ``--twins``
adds two workers of one process each on their own spools, each with the part of the
connection and in-flight limits a delivery process of two has (the dropper writing into each
in turn: two that share nothing, the ceiling for the same cores and limits); the table ends
with each setting's ratio of envelopes/s and of CPU per 1,000 to the first's. ``--rounds R``
runs it all R times (the idle case in the first round only), every other round with the settings in
reverse order (this host speeds up and slows down over minutes, which favours whichever
setting ran in a fast spell), printing each round as it ends and then each ratio's median and
range over the rounds. ``--size`` (bytes per message) and ``--rcpts`` (recipients per
envelope) shape the mail. The outsider's measure (a separate dropper, Postfix's smtp-sink as
the receiver, and Postfix itself on the same mail) is scripts/bench_outsider.py, also run as
``bench.py --outsider [-n N] [--processes ..]``.

    .venv/bin/python scripts/bench.py [--burst 10000] [--backlog 100000] [--idle 200]
                                      [--processes 1 2] [--hosts 1 2] [--twins]
                                      [--size 2048] [--rcpts 1]
                                      [--event-loop auto|asyncio|uvloop] [--dir PATH]
                                      [--sink auto|smtp-sink|python] [--keep] [--rounds R]

``--keep`` leaves the spools (remove them yourself): on this machine's disk (ext4 without a
journal) a run's clean-up slows every file the next run creates for minutes (README,
Benchmarks), so runs one after another keep theirs, as ``bench_outsider.py --keep`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bench_outsider
import yaml
from benchkit import Mail, tree_cpu, tree_peak_rss

from spoolsmtp.app.wire import share
from spoolsmtp.model.schema import DeliveryConfig, SpoolConfig
from spoolsmtp.spool.durable import write_file

ROOT = Path(__file__).resolve().parent.parent


STARTED: list[subprocess.Popen[bytes]] = []  # killed at the end if still running


def count(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if not e.name.startswith("."))


@dataclass(frozen=True)
class Setting:
    processes: int = 1
    hosts: int = 1
    twins: bool = False  # two workers of one process on their own spools: the ceiling

    def __str__(self) -> str:
        if self.twins:
            return "2 workers, own spools"
        host = f", {self.hosts} hosts" if self.hosts > 1 else ""
        return f"processes {self.processes}{host}"

    @property
    def workers(self) -> int:
        """Worker processes started (each a supervisor when ``processes`` > 1)."""
        return 2 if self.twins else self.hosts


class Run:
    """One case of one setting: a spool (two with ``twins``), the configs, the worker
    processes."""

    def __init__(self, tmp: Path, port: int, event_loop: str, setting: Setting, mail: Mail) -> None:
        self.spools = [tmp / "spool1", tmp / "spool2"] if setting.twins else [tmp / "spool"]
        self.incomings = [str(spool / "incoming") for spool in self.spools]
        for incoming in self.incomings:
            os.makedirs(incoming)
        self.mail = mail
        self.configs: list[Path] = []
        for host in range(setting.workers):
            worker: dict[str, object] = {"processes": setting.processes}
            spool: dict[str, object] = {"path": str(self.spools[host % len(self.spools)])}
            conf: dict[str, object] = {
                "hostname": "bench.example",
                "smarthost": f"127.0.0.1:{port}",
                "log_level": "warning",
                "event_loop": event_loop,
                "spool": spool,
                "worker": worker,
            }
            if setting.twins:  # each with the part of the limits a delivery process of two has
                delivery = DeliveryConfig()
                conf["delivery"] = {
                    "max_connections": share(delivery.max_connections, 2, host),
                    "max_per_destination": share(delivery.max_per_destination, 2, host),
                }
                spool["max_active"] = share(SpoolConfig().max_active, 2, host)
            if setting.workers > 1:
                own = tmp / f"h{host + 1}"
                own.mkdir()
                if not setting.twins:  # hosts of one spool
                    worker["host_id"] = f"h{host + 1}"
                conf["control"] = {
                    "socket": str(own / "control.sock"),
                    "operator_socket": str(own / "operator.sock"),
                }
            path = tmp / f"conf{host + 1}.yaml"
            path.write_text(yaml.safe_dump(conf))
            self.configs.append(path)
        self.dropped: dict[str, float] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0.0

    def drop(self, i: int, data: bytes | None = None) -> None:
        """Envelope ``i`` into incoming/ by tmp + rename, as a batch job would; ``data`` is
        it already rendered (the burst renders every envelope before its clock starts, as the
        outsider's dropper does, so that composing the mail is not counted against the
        worker on the same two cores)."""
        name = f"b{i:06d}.bsmtp"
        incoming = self.incomings[i % len(self.incomings)]  # twins: each in turn
        body = self.mail.envelope(i) if data is None else data
        # a dot-named temp file renamed into place, as a careful batch job writes (no fsync)
        write_file(f"{incoming}/{name}", body, fsync=False, sync_dir=False, mode=0o644)
        self.dropped[name] = time.time()

    def start(self) -> None:
        self.started = time.time()
        for config in self.configs:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "spoolsmtp", "run", "--config", str(config)], cwd=ROOT
                )
            )
            STARTED.append(self.procs[-1])

    def wait_done(self, n: int) -> None:
        """Until ``n`` envelopes are in done/ (both spools' with twins). Listing a folder of
        100,000 names costs tens of ms of the CPU the worker is measured on: the pause between
        looks is twenty times the last look's cost, so this polling never takes more than 5% of
        a core. The times reported come from the result records, not from when this loop
        noticed."""
        dones = [spool / "done" for spool in self.spools]
        while True:
            cost = time.process_time()
            have = sum(count(done) for done in dones if done.exists())
            cost = time.process_time() - cost
            if have >= n:
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    sys.exit(f"bench: the worker exited ({proc.returncode}) with {have}/{n} done")
            time.sleep(max(0.02, 20 * cost))

    def stop(self) -> tuple[float, float]:
        """SIGTERM the workers; the CPU seconds of their process trees and the largest peak RSS
        among their processes in MB (``tree_peak_rss``, read before the stop).

        The CPU is what wait4 reports (a process and the children it reaped) or, if more, what
        /proc said of the whole tree just before the stop, so a delivery process the
        supervisor did not reap is counted too."""
        before = sum(tree_cpu(proc.pid) for proc in self.procs)
        rss = max(tree_peak_rss(proc.pid) for proc in self.procs)
        cpu = 0.0
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            usage = reap(proc)
            cpu += usage.ru_utime + usage.ru_stime
        return max(cpu, before), rss

    def finals(self) -> dict[str, float]:
        """When each envelope's final result record was made (epoch seconds), by source name."""
        out = {}
        for path in (p for spool in self.spools for p in (spool / "results").rglob("*.json")):
            rec = json.loads(path.read_bytes())
            final = time.mktime(time.strptime(rec["updated_at"][:19], "%Y-%m-%dT%H:%M:%S"))
            final += float("0" + rec["updated_at"][19:-1]) - time.timezone
            out[rec["source"]] = final
        return out

    def latencies(self, finals: dict[str, float]) -> list[float]:
        return sorted(final - self.dropped[source] for source, final in finals.items())


def reap(proc: subprocess.Popen[bytes], grace: float = 60.0) -> resource.struct_rusage:
    """Wait for a worker sent SIGTERM; one that has not exited after ``grace`` seconds (a
    second host waiting for a spool lock that this code does not share) is killed."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = 0
            return usage
        time.sleep(0.05)
    print(f"bench: worker {proc.pid} ignored SIGTERM for {grace:.0f} s; killed", file=sys.stderr)
    proc.kill()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = -9
    return usage


Receiver = subprocess.Popen[str] | bench_outsider.Sink


def start_sink(kind: str) -> tuple[Receiver, int]:
    """The receiver and its port: Postfix's smtp-sink, a C program that takes little of the
    two cores the worker is measured on, or scripts/sink.py (asyncio) where it is not
    installed or ``--sink python`` asks for it."""
    installed = not bench_outsider.missing_tool("smtp-sink")
    if kind == "smtp-sink" and not installed:
        sys.exit("bench: --sink smtp-sink: not installed (Debian: apt-get install postfix)")
    if kind != "python" and installed:
        sink = bench_outsider.Sink(None)
        return sink, sink.port
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "sink.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline().split()[1])


def stop_sink(sink: Receiver) -> None:
    if isinstance(sink, bench_outsider.Sink):
        sink.stop()
        return
    assert sink.stdin is not None  # scripts/sink.py: exits at the end of its input
    sink.stdin.close()
    sink.wait(10)


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


Row = tuple[str, int, float | None, list[float] | None, float, float, float | None]


def run_setting(
    args: argparse.Namespace, base: Path, port: int, setting: Setting, mail: Mail, idle: bool
) -> list[Row]:
    rows: list[Row] = []
    tag = str(setting)
    if idle and args.idle:
        run = Run(base / "idle", port, args.event_loop, setting, mail)
        run.start()
        time.sleep(1.0)  # let it start before the first drop: we measure idle latency
        for i in range(args.idle):
            run.drop(i)
            run.wait_done(i + 1)
        cpu, rss = run.stop()
        lat = run.latencies(run.finals())
        rows.append((f"idle, {tag}", args.idle, None, lat, cpu, rss, None))
    if args.burst:
        run = Run(base / "burst", port, args.event_loop, setting, mail)
        rendered = [mail.envelope(i) for i in range(args.burst)]
        run.start()
        time.sleep(1.0 + setting.processes * setting.workers * 0.5)
        # the CPU the envelopes cost: not the start of the processes (three of them with two
        # delivery processes), which the backlog's figure includes
        started_cpu = sum(tree_cpu(proc.pid) for proc in run.procs)
        start = time.time()
        for i, data in enumerate(rendered):
            run.drop(i, data)
        run.wait_done(args.burst)
        cpu, rss = run.stop()
        cpu -= started_cpu
        finals = run.finals()
        rate = args.burst / (max(finals.values()) - start)
        rows.append((f"burst, {tag}", args.burst, rate, run.latencies(finals), cpu, rss, None))
    if args.backlog:
        run = Run(base / "backlog", port, args.event_loop, setting, mail)
        for i in range(args.backlog):
            run.drop(i)
        run.start()
        run.wait_done(args.backlog)
        cpu, rss = run.stop()
        finals = run.finals()
        first, end = min(finals.values()), max(finals.values())
        rate = args.backlog / (end - run.started)
        delay = first - run.started
        rows.append((f"backlog, {tag}", args.backlog, rate, None, cpu, rss, delay))
    return rows


def main() -> None:
    if "--outsider" in sys.argv:  # the outsider's measure: scripts/bench_outsider.py
        sys.argv.remove("--outsider")
        bench_outsider.main()
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1], metavar="N")
    parser.add_argument("--hosts", type=int, nargs="+", default=[1], metavar="N")
    parser.add_argument(
        "--twins",
        action="store_true",
        help="also two workers of one process each on their own spools, with a delivery "
        "process's part of the limits, the dropper writing into each in turn: two that share "
        "nothing, the ceiling for the same cores and limits",
    )
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--rcpts", type=int, default=1, help="recipients per envelope")
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument(
        "--dir", type=Path, default=ROOT, help="where the spools go (its file system is measured)"
    )
    parser.add_argument(
        "--sink",
        choices=("auto", "smtp-sink", "python"),
        default="auto",
        help="the receiver: Postfix's smtp-sink (auto: where installed) or scripts/sink.py",
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the spools (no inodes freed for the next run)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the settings this many times, every other round in reverse order; the "
        "ratios' median and range end the report",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    settings = list(dict.fromkeys(Setting(p, h) for h in args.hosts for p in args.processes))
    if args.twins:
        settings.append(Setting(twins=True))
    mail = Mail(args.size, args.rcpts)
    sink, port = start_sink(args.sink)
    receiver = "smtp-sink (C)" if isinstance(sink, bench_outsider.Sink) else "scripts/sink.py"
    # One folder for all cases, removed at the very end: ext4 without a journal (this
    # machine's disk) skips inodes freed in the last 60 s (360 s while their inode table block
    # is not yet written back) when it allocates one, looking at each in turn, so deleting a
    # finished case's 30,000 files would slow down every file the next case creates.
    outer = Path(tempfile.mkdtemp(dir=args.dir, prefix=".bench-"))
    rounds: list[list[Row]] = []
    try:
        for r in range(args.rounds):
            # every other round in the opposite order, so that a host that speeds up or
            # slows down over the minutes of a run does not favour the setting run first
            order = list(enumerate(settings))
            by_setting: dict[int, list[Row]] = {}
            for n, setting in order if r % 2 == 0 else order[::-1]:
                base = outer / (f"s{n}" if args.rounds == 1 else f"r{r + 1}s{n}")
                idle = r == 0 and n == 0
                by_setting[n] = run_setting(args, base, port, setting, mail, idle)
            # the table in the order of the settings, whichever way the round ran them
            rows = [row for n in sorted(by_setting) for row in by_setting[n]]
            rounds.append(rows)
            # each round as it ends: a later one that fails loses nothing measured
            if r == 0:
                print(f"event loop: {args.event_loop} (auto: uvloop where installed); {mail}")
                print(f"receiver: {receiver}")
            if args.rounds > 1:
                reverse = " (settings in reverse)" if r % 2 else ""
                print(f"round {r + 1} of {args.rounds}{reverse}")
            print_table(rows)
            print_ratios(ratios(rows, settings), settings)
            sys.stdout.flush()
    finally:
        for proc in STARTED:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stop_sink(sink)
        if args.keep:
            print(f"kept {outer}")
        else:
            shutil.rmtree(outer, ignore_errors=True)
    if len(rounds) > 1 and len(settings) > 1:
        print_spread([ratios(rows, settings) for rows in rounds], settings)


def print_table(rows: list[Row]) -> None:
    heads = ("N", "env/s", "p50 ms", "p99 ms", "CPU s/1000", "peak RSS MB", "first s")
    print(f"{'case':32} " + " ".join(f"{h:>{max(7, len(h))}}" for h in heads))
    for label, n, rate, latencies, cpu, rss, first_s in rows:
        lat = latencies or []
        p50 = f"{quantile(lat, 0.5) * 1000:7.1f}" if lat else "      -"
        p99 = f"{quantile(lat, 0.99) * 1000:7.1f}" if lat else "      -"
        r = f"{rate:7.0f}" if rate else "      -"
        f = f"{first_s:7.2f}" if first_s is not None else "      -"
        print(f"{label:32} {n:7d} {r} {p50} {p99} {cpu / n * 1000:10.2f} {rss:11.1f} {f}")


Ratios = dict[tuple[str, str], tuple[float, float]]


def ratios(rows: list[Row], settings: list[Setting]) -> Ratios:
    """Each later setting against the first, by (setting, case): envelopes/s and CPU per
    1,000, burst and backlog."""
    by_label = {label: (rate, cpu / n) for label, n, rate, _, cpu, _, _ in rows}
    first = str(settings[0])
    out: Ratios = {}
    for setting in settings[1:]:
        for case in ("burst", "backlog"):
            base, this = by_label.get(f"{case}, {first}"), by_label.get(f"{case}, {setting}")
            if base and this and base[0] and this[0] and base[1]:
                out[str(setting), case] = (this[0] / base[0], this[1] / base[1])
    return out


def print_ratios(found: Ratios, settings: list[Setting]) -> None:
    if len(settings) < 2:
        return
    print(f"ratios to {settings[0]} (env/s, CPU per 1,000):")
    for setting in settings[1:]:
        parts = [
            f"{case} {rate:.2f}x, CPU {cpu:.2f}x"
            for (tag, case), (rate, cpu) in found.items()
            if tag == str(setting)
        ]
        print(f"  {setting}: " + "; ".join(parts))


def print_spread(each: list[Ratios], settings: list[Setting]) -> None:
    """Over the rounds: each ratio's median and its range."""

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"

    print(f"over {len(each)} rounds, median (range) of the ratios to {settings[0]}:")
    for key in each[0]:
        rates = [r[key][0] for r in each if key in r]
        cpus = [r[key][1] for r in each if key in r]
        print(f"  {key[0]}, {key[1]}: env/s {spread(rates)}, CPU per 1,000 {spread(cpus)}")


if __name__ == "__main__":
    main()
