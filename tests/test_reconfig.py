"""RELOAD's plan: every key is applied or named as needing a restart, and one that needs a
restart keeps its old value in the configuration the worker runs with."""

from __future__ import annotations

import dataclasses

from spoolsmtp.app.reconfig import RESTART, flatten, plan, renewed_resolver
from spoolsmtp.delivery.mx import HOPS, Lookup, MxResolver, Resolution
from spoolsmtp.model.config import Config, parse

OLD = parse(
    "spool: {path: /var/spool/s, max_active: 10}\n"
    "delivery: {max_connections: 100, timeouts: {connect: 30s}}\n"
    "dns: {nameservers: [127.0.0.1], port: 53}\n",
    "conf.yaml",
)


def _new(extra: str) -> Config:
    return parse(
        "spool: {path: /var/spool/s, max_active: 10}\n"
        "delivery: {max_connections: 100, timeouts: {connect: 30s}}\n"
        "dns: {nameservers: [127.0.0.1], port: 53}\n" + extra,
        "conf.yaml",
    )


def test_nothing_changed_is_nothing_to_say() -> None:
    done = plan(OLD, _new("")).done
    assert done.changed == () and done.restart == ()
    assert done.summary == "conf.yaml reloaded"


def test_a_live_key_is_applied_and_a_restart_key_is_named_and_kept() -> None:
    new = parse(
        "spool: {path: /var/spool/s, max_active: 50}\n"
        "delivery: {max_connections: 7, timeouts: {connect: 5s}}\n"
        "dns: {nameservers: [127.0.0.1], port: 53}\n"
        "retry: {interval: 1m}\n",
        "conf.yaml",
    )
    p = plan(OLD, new)
    assert p.done.changed == (
        "delivery.max_connections",
        "delivery.timeouts.connect",
        "retry.interval",
        "spool.max_active",
    )
    assert p.done.restart == ("delivery.max_connections", "spool.max_active")
    assert p.done.summary == (
        "conf.yaml reloaded; needs a restart to take effect: "
        "delivery.max_connections, spool.max_active"
    )
    assert p.config.delivery.max_connections == 100 and p.config.spool.max_active == 10
    assert p.config.delivery.timeouts.connect == 5.0 and p.config.retry.interval == 60.0
    assert not p.renew_resolver


def test_dns_settings_renew_the_resolver_with_its_counters_and_an_empty_cache() -> None:
    more = dataclasses.replace(OLD.delivery, max_addresses=2)
    assert plan(OLD, dataclasses.replace(OLD, delivery=more)).renew_resolver
    p = plan(OLD, dataclasses.replace(OLD, dns=dataclasses.replace(OLD.dns, port=5353)))
    assert p.done.changed == ("dns.port",) and p.done.restart == () and p.renew_resolver
    old = MxResolver(OLD.dns, 5, 25)
    old.stats.lookups = 3
    old._answers.put(("example.org", HOPS), Resolution(), float("inf"), 0.0)
    old._answers.put(("_25._tcp.mx.example.org", "TLSA"), Lookup(), float("inf"), 0.0)
    new = renewed_resolver(old, p.config)
    assert new.config.port == 5353 and new.stats is old.stats and new.cached() == []
    assert old.cached() == ["example.org"] and new._answers.questions() == []


def test_routes_and_the_smarthost_are_one_key_each_and_live() -> None:
    p = plan(OLD, _new("smarthost: 10.0.0.1:2525\nroutes: {a.example: 10.0.0.2}\n"))
    assert p.done.changed == ("routes", "smarthost") and p.done.restart == ()
    assert p.config.smarthost is not None and p.config.smarthost.port == 2525


def test_every_restart_key_is_a_key_of_the_configuration() -> None:
    keys = set(flatten(Config()))
    assert keys >= RESTART, RESTART - keys


def test_the_number_of_processes_and_the_host_need_a_restart() -> None:
    """The supervisor and its processes are started so: RELOAD names them and keeps them
    (an operator trial found worker.processes applied in name only, 3 said, 2 running)."""
    p = plan(OLD, _new("worker: {processes: 3, host_id: mail1}\n"))
    assert p.done.restart == ("worker.host_id", "worker.processes")
    assert p.config.worker.processes == OLD.worker.processes
    assert p.config.worker.host_id == OLD.worker.host_id
