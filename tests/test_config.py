"""Configuration: units, the schema's checks, the sample file, and ``run --check-config``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from spoolsmtp.app import cli, eventloop
from spoolsmtp.model import config
from spoolsmtp.model.config import TlsPolicy
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.units import format_duration, parse_duration, parse_size

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20m", 1200), ("3d", 259200), ("500ms", 0.5), ("1.5h", 5400), (45, 45), ("10", 10)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("10MB", 10_000_000), ("512KiB", 524288), (1024, 1024), ("1gb", 10**9)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["20 minutes", "-1", True, "m"])
def test_bad_durations_say_what_is_expected(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_format_duration_round_trips() -> None:
    for value in (0.5, 30, 1200, 259200, 90):
        assert parse_duration(format_duration(value)) == value


def test_a_typo_is_caught_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse("delivery:\n  max_conections: 3\n", "c.yaml")
    assert info.value.key == "delivery.max_conections"
    assert "did you mean 'delivery.max_connections'" in str(info.value)
    assert str(info.value).startswith("c.yaml: delivery.max_conections: unknown key")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("limits:\n  recipients: lots\n", "limits.recipients", "whole number"),
        ("limits:\n  recipients: 0\n", "limits.recipients", "at least 1"),
        ("spool:\n  settle_seconds: soon\n", "spool.settle_seconds", "duration"),
        ("limits:\n  max_message_bytes: big\n", "limits.max_message_bytes", "size"),
        ("delivery:\n  tls: maybe\n", "delivery.tls", "opportunistic"),
        ("delivery: 3\n", "delivery", "mapping"),
        ("routes:\n  example.org: 'host:99999'\n", "routes.example.org", "port"),
        ("routes:\n  example.org: {hots: x}\n", "routes.example.org.hots", "unknown key"),
        ("dns:\n  nameservers: 127.0.0.1\n", "dns.nameservers", "list"),
        ("delivery:\n  reuse_connections: yes please\n", "delivery.reuse_connections", "true"),
        ("event_loop: tokio\n", "event_loop", "uvloop"),
        ("worker:\n  processes: many\n", "worker.processes", "whole number"),
        ("worker:\n  processes: 0\n", "worker.processes", "at least 1"),
        ("worker:\n  host_id: a/b\n", "worker.host_id", "letters, digits"),
    ],
)
def test_wrong_values_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "c.yaml")
    assert info.value.key == key
    assert problem in info.value.problem


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(ConfigError, match="line 2"):
        config.parse("a: 1\n  b: : 2\n", "c.yaml")


def test_processes_auto_is_the_number_of_cores() -> None:
    assert config.parse("worker:\n  processes: auto\n").worker.processes == (os.cpu_count() or 1)
    assert config.parse("worker:\n  processes: 2\n  host_id: mvs1\n").worker.host_id == "mvs1"


def test_routes_and_smarthost_forms() -> None:
    cfg = config.parse(
        "routes:\n  example.org: mx1.example.org\n  '*.corp.example': '[::1]:2525'\n"
        "  other.example: {host: 127.0.0.1, port: 26, tls: required}\n"
        "smarthost: relay.example:587\n",
        "c.yaml",
    )
    assert cfg.routes["example.org"] == config.Route("mx1.example.org", None)  # delivery.port
    assert cfg.routes["*.corp.example"] == config.Route("::1", 2525)
    assert cfg.routes["other.example"] == config.Route("127.0.0.1", 26, TlsPolicy.REQUIRED)
    assert cfg.smarthost == config.Route("relay.example", 587)


def test_the_shipped_config_states_exactly_the_defaults() -> None:
    shipped = config.load(ROOT / "conf" / "spoolsmtp.yaml")
    assert shipped.source.endswith("spoolsmtp.yaml")
    defaults = config.Config()
    for name in (
        "hostname",
        "spool",
        "limits",
        "delivery",
        "dns",
        "routes",
        "smarthost",
        "dkim",
        "retry",
        "bounces",
        "control",
        "submit",
        "netdata",
        "rewrite",
        "shutdown_timeout",
        "log_level",
        "event_loop",
    ):
        assert getattr(shipped, name) == getattr(defaults, name), name


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("limits:\n  recipients: 10\n")
    assert cli.main(["run", "--config", str(good), "--check-config"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  recipents: 10\n")
    assert cli.main(["run", "--config", str(bad), "--check-config"]) == 78
    err = capsys.readouterr().err
    assert f"{bad}: limits.recipents: unknown key (did you mean 'limits.recipients'?)" in err
    assert cli.main(["run", "--config", str(tmp_path / "missing.yaml"), "--check-config"]) == 78


def test_uvloop_asked_for_but_missing_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(ConfigError) as info:
        eventloop.factory(config.parse("event_loop: uvloop\n", "c.yaml"))
    assert info.value.key == "event_loop"
    assert "not installed" in info.value.problem
    assert eventloop.factory(config.parse("event_loop: auto\n", "c.yaml")) == ("asyncio", None)


def test_tls_off_unquoted_means_off() -> None:
    """``tls: off`` as the shipped config's comment writes it: YAML reads a bare off as
    false, which was refused ("got False (bool)"); a route's and delivery's tls take it."""
    cfg = config.parse(
        "delivery: {tls: off}\nroutes: {example.org: {host: mx.example.org, tls: off}}\n"
    )
    assert cfg.delivery.tls is TlsPolicy.OFF
    assert cfg.routes["example.org"].tls is TlsPolicy.OFF
    with pytest.raises(ConfigError, match=r"delivery\.tls"):
        config.parse("delivery: {tls: on}\n")  # no policy is called on
