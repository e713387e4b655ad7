"""RELOAD: which configuration keys a running worker applies, and which wait for a restart.

Every key is one or the other. ``plan(old, new)`` compares the two configurations key by key and
gives the configuration to run with: the new one, except that each changed key in ``RESTART``
keeps its old value (so what the worker reports and uses is what it runs with), and the answer,
which names those keys. Pure; the worker applies the plan.

Applied at once: routes and the smarthost, hostname, limits, retry, bounces, the delivery
settings read per connection (TLS, timeouts, pipelining, reuse, idle time), the DNS settings and
``delivery.max_addresses`` / ``delivery.port`` (a new resolver: ``renewed_resolver``; its cache
goes, its counters stay), ``spool.max_file_bytes``, ``spool.rescan_interval``, the disk reserve,
who may use the control channel and its per-connection limits, ``shutdown_timeout``, ``submit``.
Kept until a restart: ``RESTART``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spoolsmtp.control.port import Reloaded
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.config import Config, Route
from spoolsmtp.model.errors import ConfigError

# a key, or a section whose every key, needs a restart (and why)
RESTART = frozenset(
    {
        # where the spool and its folders are: the worker holds its lock and watches them
        "spool.path",
        *(
            f"spool.{name}"
            for name in (
                "incoming",
                "active",
                "deferred",
                "hold",
                "done",
                "results",
                "bounces",
                "rejected",
                "deadletter",
                "journal",
            )
        ),
        "spool.settle_seconds",  # the watcher's, set at start
        "spool.max_active",  # a semaphore with holders
        # the legacy-file conversion is chosen at start (and files in flight use one)
        "spool.encoding",
        "spool.strip_trailing_blanks",
        "spool.record_length",
        # semaphores with holders
        "delivery.max_connections",
        "delivery.max_per_destination",
        # the sockets are bound at start
        "control.socket",
        "control.mode",
        "control.group",
        "control.max_line",
        "control.backlog",
        "control.operator_socket",
        "control.operator_group",
        # the node it runs as: its area, lock and sockets are taken at start
        "worker.host_id",
        # the supervisor and its processes are started so (the limits split among them)
        "worker.processes",
        # incoming/ and results/ are given to the submitters' group (and the umask set) at start
        "submit.group",
        # the process: its user, its log set-up, its event loop
        "user",
        "log_level",
        "log_format",
        # the metrics endpoint is bound at start
        "metrics.listen",
        "event_loop",
    }
)
# the keys the resolver is built from
RESOLVER = ("dns", "delivery.max_addresses", "delivery.port")


@dataclass(frozen=True)
class Plan:
    """What a RELOAD does: the configuration to run with, the answer, and whether the resolver
    is to be built again."""

    config: Config
    done: Reloaded
    renew_resolver: bool


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every key of a configuration by its dotted name (a route, the routes: one key each)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, Route):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = value
    return out


def _within(key: str, names: frozenset[str] | tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(f"{n}.") for n in names)


def _replaced(cfg: Any, key: str, value: Any) -> Any:
    """``cfg`` with the dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replaced(getattr(cfg, head), rest, value)})


def plan(old: Config, new: Config) -> Plan:
    """What reloading ``new`` over a worker running with ``old`` does."""
    before, after = flatten(old), flatten(new)
    changed = tuple(sorted(k for k in after if before.get(k) != after[k]))
    restart = tuple(k for k in changed if _within(k, RESTART))
    config = new
    for key in restart:
        config = _replaced(config, key, before[key])
    done = Reloaded(new.source, changed, restart)
    return Plan(config, done, any(_within(k, RESOLVER) for k in changed))


def renewed_resolver(old: MxResolver, cfg: Config) -> MxResolver:
    """A resolver with the DNS settings of ``cfg`` and the counters and trace of ``old``, with
    an empty cache (answers found with the old settings are not kept, the destinations' nor
    DANE's and MTA-STS's records: the cache is no init field, so ``replace`` makes a new one).
    ``ConfigError`` if the system has no resolver configuration and ``dns.nameservers`` is
    empty."""
    return dataclasses.replace(
        old,
        config=cfg.dns,
        max_addresses=cfg.delivery.max_addresses,
        port=cfg.delivery.port,
    )


def on_hangup(reload: Callable[[], object]) -> None:
    """SIGHUP: RELOAD, as Postfix's master and most daemons take it (and a terminal that
    hangs up no longer ends a worker started from it). A bad file changes nothing and is one
    line in the log; what was applied is logged by the reload itself."""
    log = logging.getLogger("spoolsmtp")
    log.info("SIGHUP: reading the configuration again")
    try:
        reload()
    except (ConfigError, OSError) as exc:
        log.error("SIGHUP: config error, nothing changed: %s", exc)
