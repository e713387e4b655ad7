"""The ``spoolsmtp`` command line: parses arguments and hands each subcommand to its module."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spoolsmtp.app import (
    child,
    configpath,
    cpusched,
    deliver_cmd,
    eventloop,
    heap,
    logsetup,
    outstream,
    privileges,
    queue_cmd,
    submit,
    top_cmd,
)
from spoolsmtp.app.removal import Reboot
from spoolsmtp.app.supervisor import Supervisor
from spoolsmtp.app.worker import Worker
from spoolsmtp.bsmtp import response
from spoolsmtp.control import client as ctl
from spoolsmtp.control.sockets import SocketInUse
from spoolsmtp.delivery import deliverer, tlsplan
from spoolsmtp.model import config as configmod
from spoolsmtp.model import exitcodes
from spoolsmtp.model.errors import ConfigError, EnvelopeFault
from spoolsmtp.model.units import parse_duration
from spoolsmtp.spool import envfile
from spoolsmtp.spool.diskfull import SpoolNotWritable

_CALLER_CONFIG = "YAML config (default $SPOOLSMTP_CONFIG, else /etc/spoolsmtp/spoolsmtp.yaml)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spoolsmtp", description="Batch SMTP spool processor (a VM/MVS SMTP service machine)."
    )
    parser.add_argument("--version", action="version", version=f"spoolsmtp {outstream.version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the worker over the spool")
    run.add_argument("--config", type=Path, help="YAML config (default conf/spoolsmtp.yaml)")
    run.add_argument("--check-config", action="store_true", help="validate the config and exit")

    # a supervisor's delivery process: no help, so that --help does not list it (argparse
    # shows help=SUPPRESS as "==SUPPRESS=="), and left out of the usage line below
    kid = sub.add_parser("child")
    kid.add_argument("--config", type=Path, required=True)
    kid.add_argument("--config-fd", type=int, help="the configuration to run on, as YAML")
    kid.add_argument("--node", required=True)
    kid.add_argument("--fd", type=int, required=True)
    kid.add_argument("--parent", type=int, required=True)
    kid.add_argument("--of", required=True, help="INDEX/COUNT")
    kid.add_argument("--sched", type=int, help="the CPU scheduling policy to deliver under")

    deliver = sub.add_parser(
        "deliver", help="one delivery attempt for an envelope, in the foreground"
    )
    deliver.add_argument("--config", type=Path, help="YAML config (default conf/spoolsmtp.yaml)")
    deliver.add_argument("-v", "--verbose", action="store_true", help="print the SMTP dialogue")
    deliver.add_argument("file", type=Path, metavar="FILE")

    control = sub.add_parser("ctl", help="talk to a running worker over the control socket")
    control.add_argument("--config", type=Path, help=_CALLER_CONFIG)
    control.add_argument("--json", action="store_true", help="one JSON object per command")
    control.add_argument("--socket", type=Path, help="the control socket (default from config)")
    control.add_argument("--follow", action="store_true", help="after TRACE: stream the trace here")
    control.add_argument("words", nargs="+", metavar="COMMAND")

    sub_cmd = sub.add_parser("submit", help="wrap a message in an envelope and queue it")
    sub_cmd.add_argument("--config", type=Path, help=_CALLER_CONFIG)
    sub_cmd.add_argument("-f", dest="sender", help="envelope sender (default: submit.sender)")
    sub_cmd.add_argument("-t", action="store_true", help="recipients from To/Cc/Bcc (Bcc removed)")
    sub_cmd.add_argument("-i", "-oi", action="store_true", help="a lone '.' does not end input")
    sub_cmd.add_argument("-F", dest="full_name", help="full name for an added From header")
    sub_cmd.add_argument(
        "--verb", action="store_true", help="ask for VERB ON (results/ID.response)"
    )
    sub_cmd.add_argument("--file", type=Path, help="read the message from FILE, not stdin")
    sub_cmd.add_argument(
        "--wait",
        nargs="?",
        const="0",
        metavar="SECONDS",
        help="wait for the final result (0 or none: no limit); exit 0/67/75",
    )
    sub_cmd.add_argument("--json", action="store_true", help="with --wait: print the record")
    sub_cmd.add_argument("recipients", nargs="*", metavar="RCPT")

    check = sub.add_parser("check", help="validate envelope files and print the batch response")
    check.add_argument("--config", type=Path, help="YAML config (default conf/spoolsmtp.yaml)")
    check.add_argument("-q", "--quiet", action="store_true", help="print only errors and verdicts")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    queue_cmd.add_parser(sub)
    top_cmd.add_parser(sub, _CALLER_CONFIG)
    sub.metavar = "{" + ",".join(c for c in sub.choices if c != "child") + "}"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command; a reader of its output that went away (``| head``) ends it quietly."""
    return outstream.quiet_on_broken_pipe(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exitcodes.USAGE if exc.code not in (0, None) else exitcodes.OK
    try:
        cfg = _config(args)
    except ConfigError as exc:
        prog = f"spoolsmtp {args.command}" if args.command in ("submit", "ctl") else "spoolsmtp"
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    if args.command in ("run", "child"):
        return _run(cfg, args)
    if args.command == "deliver":
        try:
            return deliver_cmd.deliver_file(cfg, args.file, verbose=args.verbose)
        except ConfigError as exc:  # a logins or DKIM key file it cannot use
            print(f"spoolsmtp: config error: {exc}", file=sys.stderr)
            return exitcodes.CONFIG
    if args.command == "submit":
        return _submit(cfg, args)
    if args.command in ("ctl", "top"):
        paths, trusted = ctl.targets(
            cfg.operator_socket,
            cfg.control_socket,
            cfg.user,
            cfg.spool.folder("active"),
            args.socket,
        )
        if args.command == "top":
            return top_cmd.run(paths, trusted, args)
        return ctl.run(paths, args.words, as_json=args.json, follow=args.follow, trusted=trusted)
    if args.command == "check":
        return _check(cfg, args.files, quiet=args.quiet)
    if args.command == "queue":
        return queue_cmd.run(cfg, args)
    parser.error(f"unknown command {args.command}")
    return exitcodes.USAGE


def _config(args: argparse.Namespace) -> configmod.Config:
    """submit and ctl never read a config from the current folder (see ``configpath``)."""
    if args.command == "child" and args.config_fd is not None:
        # what the supervisor runs on (children.py), named after its file
        with os.fdopen(args.config_fd, encoding="utf-8") as given:
            return configmod.parse(given.read(), str(args.config))
    if args.command == "submit":
        return configpath.load_for_callers(args.config, control=args.wait is not None)
    if args.command in ("ctl", "top") and args.socket is not None:
        # --socket names the worker: a config with an error must not keep the operator from it
        try:
            return configpath.load_for_callers(args.config, spool=False)
        except ConfigError:
            return configmod.Config()
    if args.command in ("ctl", "top"):
        return configpath.load_for_callers(args.config, spool=False, control=args.socket is None)
    return configpath.load_for_operators(args.config)


def _run(cfg: configmod.Config, args: argparse.Namespace) -> int:
    try:
        _, loop_factory = eventloop.factory(cfg)
        tlsplan.require_dane_support(cfg)
        if getattr(args, "check_config", False):
            deliverer.usable(cfg)  # the logins and DKIM keys it names: readable and safe
            print(f"{cfg.source}: configuration OK")
            return exitcodes.OK
        logsetup.configure(cfg.log_level, cfg.log_format)
        if args.command == "child":  # started by the supervisor, which became the user
            return _child(cfg, args, loop_factory)
        privileges.become(cfg)
        heap.settle()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            if cfg.worker.processes > 1:
                code = runner.run(Supervisor(cfg).run())
            else:
                code = runner.run(Worker(cfg).run())
        if Reboot.requested and code == exitcodes.OK:
            Reboot.execute()  # REBOOT: the spool released, the same command line again
        return code
    except SocketInUse as exc:  # a worker runs there already: as for a spool in use
        print(f"spoolsmtp: {exc}", file=sys.stderr)
        return exitcodes.TEMPFAIL
    except ConfigError as exc:
        print(f"spoolsmtp: config error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    except SpoolNotWritable as exc:
        # a spool that cannot be created or written (read-only, another owner): one line
        print(f"spoolsmtp: {exc.filename}: cannot write the spool: {exc.strerror}", file=sys.stderr)
        return exitcodes.CANTCREAT
    except OSError as exc:  # anything else the worker cannot start without: one line too
        where = exc.filename or cfg.spool.path
        print(f"spoolsmtp: {where}: {exc.strerror or exc}", file=sys.stderr)
        return exitcodes.CANTCREAT


def _child(cfg: configmod.Config, args: argparse.Namespace, loop_factory: Any) -> int:
    index, _, count = args.of.partition("/")
    cpusched.back_to(args.sched)  # the supervisor's first policy, not its batch one
    heap.settle()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(child.run(cfg, args.node, args.fd, args.parent, int(count), int(index)))


def _submit(cfg: configmod.Config, args: argparse.Namespace) -> int:
    wait: float | None = None
    if args.wait is not None:
        try:
            wait = parse_duration(args.wait)
        except ValueError as exc:
            print(f"spoolsmtp submit: --wait: {exc}", file=sys.stderr)
            return exitcodes.USAGE
    sub = submit.Submission(
        sender=_unbracket(args.sender) if args.sender is not None else None,
        recipients=tuple(args.recipients),
        from_headers=args.t,
        dot_ends=not args.i and args.file is None,
        full_name=args.full_name,
        verbose=args.verb,
    )
    if args.file is not None:
        try:
            with open(args.file, "rb") as fh:
                return submit.submit(cfg, sub, fh, wait_seconds=wait, as_json=args.json)
        except FileNotFoundError:
            print(f"spoolsmtp submit: {args.file}: no such file", file=sys.stderr)
            return exitcodes.NOINPUT
    return submit.submit(cfg, sub, sys.stdin.buffer, wait_seconds=wait, as_json=args.json)


def _unbracket(address: str) -> str:
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def _check(cfg: configmod.Config, files: list[Path], *, quiet: bool) -> int:
    status = exitcodes.OK
    for path in files:
        name = response.shown(str(path))
        try:
            with envfile.converted(path, cfg.spool, cfg.netdata, cfg.helo_name) as readable:
                env = envfile.read(
                    readable,
                    cfg.limits,
                    cfg.helo_name,
                    max_file_bytes=cfg.spool.max_file_bytes,
                    source=str(path),
                )
        except FileNotFoundError:
            print(f"{name}: no such file", file=sys.stderr)
            status = max(status, exitcodes.NOINPUT)
            continue
        except IsADirectoryError:
            print(f"{name}: is a directory", file=sys.stderr)
            status = max(status, exitcodes.NOINPUT)
            continue
        except UnicodeError as exc:
            print(f"{name}:1: cannot convert from {cfg.spool.encoding}: {response.shown(str(exc))}")
            status = max(status, exitcodes.DATAERR)
            continue
        except EnvelopeFault as exc:
            print(response.shown(str(exc)))
            print(f"{name}: REJECTED, not an envelope; nothing of it would be sent")
            status = max(status, exitcodes.DATAERR)
            continue
        if not quiet:
            sys.stdout.write(response.render(env))
        for line in response.error_lines(env):
            print(line)
        print(response.verdict(env))
        if not env.accepted:
            status = max(status, exitcodes.DATAERR)
    return status
