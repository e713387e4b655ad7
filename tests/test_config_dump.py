"""``config.dump``: what a supervisor hands its delivery processes reads back to the same
configuration, whatever the keys hold (durations, sizes, routes, enums, lists, mappings)."""

from __future__ import annotations

from pathlib import Path

import yaml

from spoolsmtp.model import config

RICH = """
hostname: mx.example.org
spool: {path: /var/spool/x, settle_seconds: 500ms, rescan_interval: 2s, max_file_bytes: 10MB,
        max_active: 300, encoding: cp1047, done: /var/spool/x-done}
limits: {text_line: 2000, max_message_bytes: 50MB, recipients: 200}
delivery:
  port: 2525
  max_connections: 40
  tls: dane
  tls_min_version: TLSv1.3
  timeouts: {connect: 10s, data_end: 10m}
  mta_sts: {enabled: true, timeout: 5s}
dns: {nameservers: [127.0.0.1, "::1"], port: 5353, max_ttl: 1h, allow_loopback: true}
routes:
  example.com: relay.example.net:587
  example.net: {host: "[2001:db8::1]", port: 25, tls: verify}
smarthost: smart.example.org
retry: {interval: 1m, max_interval: 2h, max_age: 5d, warning_age: 0}
bounces: {requeue: false}
control: {socket: /run/x.sock, authorized_users: [root, "1000"], max_line: 8192}
submit: {group: mail, allowed_users: [alice], sender_policy: owner, senders: {alice: [a@x.org]}}
worker: {processes: 3, host_id: mail1}
metrics: {listen: "127.0.0.1:9479"}
rewrite: {qualify_domain: example.org, addresses: {"user at NODE1": user@example.org},
          nicknames: {ops: ops@x.org}}
shutdown_timeout: 45s
log_level: debug
log_format: json
event_loop: asyncio
"""


def _round_trip(cfg: config.Config) -> config.Config:
    return config.parse(yaml.safe_dump(config.dump(cfg)), cfg.source)


def test_a_rich_configuration_reads_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "rich.yaml"
    path.write_text(RICH)
    cfg = config.load(path)
    assert _round_trip(cfg) == cfg
    assert cfg.delivery.tls.value == "dane" and cfg.worker.host_id == "mail1"  # it was read


def test_the_defaults_and_the_shipped_config_read_back_the_same() -> None:
    shipped = Path(__file__).resolve().parent.parent / "conf" / "spoolsmtp.yaml"
    for cfg in (config.Config(), config.load(shipped)):
        assert _round_trip(cfg) == cfg
