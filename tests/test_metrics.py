"""Metrics: a real worker's ``ctl METRICS`` and ``GET /metrics``, read by prometheus-client's
own parser; the format writer and the sum of two workers' counters, alone."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from spoolsmtp.control import exposition as ex
from spoolsmtp.control.metrics import Gauges, families
from spoolsmtp.control.metricshttp import MetricsEndpoint
from spoolsmtp.control.port import Traffic
from spoolsmtp.model import config
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.stats import Histogram, Stats, added
from spoolsmtp.model.stats import from_dict as stats_from_dict
from spoolsmtp.model.stats import to_dict as stats_to_dict
from tests.helpers import draft
from tests.hostile import IS_ROOT, cli_as_nobody, reachable_by_others
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import ROOT, ctl, start_worker, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """Every sample of an exposition, as prometheus-client parses it."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sent(samples: Samples, status: str, dsn_class: str) -> float:
    return samples["spoolsmtp_recipients_total", (("dsn_class", dsn_class), ("status", status))]


def _check(samples: Samples) -> None:
    """What the run did: 3 sent, 1 bounced, 1 deferred, one report, one envelope deferred."""
    assert _sent(samples, "sent", "2") == 3
    assert _sent(samples, "bounced", "5") == 1
    assert _sent(samples, "deferred", "4") == 1
    assert _sent(samples, "expired", "5") == 0
    assert samples["spoolsmtp_envelopes_taken_total", ()] == 1
    assert samples["spoolsmtp_reports_total", ()] == 1
    # the latency of each final recipient: 3 sent and 1 bounced, under an hour
    assert samples["spoolsmtp_delivery_latency_seconds_count", ()] == 4
    assert samples["spoolsmtp_delivery_latency_seconds_bucket", (("le", "3600.0"),)] == 4
    assert samples["spoolsmtp_delivery_latency_seconds_bucket", (("le", "+Inf"),)] == 4
    assert samples["spoolsmtp_queue_envelopes", (("state", "deferred"),)] == 1
    assert samples["spoolsmtp_queue_envelopes", (("state", "bounces"),)] == 1
    assert samples["spoolsmtp_queue_envelopes", (("state", "active"),)] == 0
    assert samples["spoolsmtp_queue_oldest_age_seconds", (("state", "deferred"),)] > 0
    assert samples["spoolsmtp_dead_destinations", ()] == 0
    assert samples["spoolsmtp_disk_full_pauses_total", ()] == 0


def test_ctl_metrics_and_the_endpoint_say_what_happened(tmp_path: Path) -> None:
    srv = SmtpServer(
        Script(
            rcpt={
                "gone@example.org": "550 5.1.1 no such user",
                "busy@example.org": "450 4.2.1 mailbox busy",
            }
        )
    )
    port = _free_port()
    w = start_worker(
        tmp_path,
        srv,
        retry={"interval": "1h"},
        metrics={"listen": f"127.0.0.1:{port}"},
        bounces={"requeue": False},  # only the batch's recipients are counted here
    )
    try:
        w.drop_drafts(
            "batch.bsmtp",
            [
                draft("a@example.com", ["ok1@example.org", "gone@example.org", "busy@example.org"]),
                draft("b@example.com", ["ok2@example.org", "ok3@example.org"]),
            ],
        )
        wait_for(lambda: w.in_state("batch.bsmtp", "deferred"), what="batch deferred")
        done = ctl(w.config, "METRICS")
        assert done.returncode == 0, done.stderr
        _check(_samples(done.stdout))
        if IS_ROOT:  # open to everyone, as STATS: an ordinary user gets the same
            reachable_by_others(w.spool)
            code, out, err = cli_as_nobody(
                ["ctl", "--socket", str(w.control_socket), "METRICS"], tmp_path
            )
            assert code == 0, err
            _check(_samples(out.decode()))
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"] == ex.CONTENT_TYPE
            _check(_samples(answer.read().decode()))
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, b"x", method="POST"), timeout=10)
        refused.value.close()
        assert refused.value.code == 405
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        missing.value.close()
        assert missing.value.code == 404
    finally:
        assert w.stop() == 0
        srv.stop()
    assert f"metrics: serving GET /metrics on 127.0.0.1:{port}" in w.log.read_text()


def test_a_port_taken_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "conf.yaml"
        settings: dict[str, Any] = {
            "spool": {"path": str(tmp_path / "spool")},
            "metrics": {"listen": f"127.0.0.1:{port}"},
        }
        config.write_text(yaml.safe_dump(settings))
        done = subprocess.run(
            [sys.executable, "-m", "spoolsmtp", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            check=False,
        )
    assert done.returncode == 78
    assert "metrics.listen" in done.stderr and "cannot listen" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "spool" / "control.sock").exists()


@pytest.mark.parametrize("listen", ["127.0.0.1", "9469", "::1:9469", "host:port"])
def test_listen_needs_host_and_port(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        config.parse(yaml.safe_dump({"metrics": {"listen": listen}}))
    assert config.parse("metrics: {listen: '[::1]:9469'}").metrics.listen == "[::1]:9469"


# -- the pure parts ----------------------------------------------------------------------------


def test_label_values_and_help_are_escaped_as_the_parser_reads_them() -> None:
    nasty = 'a "quoted" back\\slash\nnew line'
    text = ex.render(
        [
            ex.counter("x_total", "help with \\ and\nnewline", 2, (("what", nasty),)),
            ex.gauge("y", "a gauge", 0.25),
        ]
    )
    assert 'what="a \\"quoted\\" back\\\\slash\\nnew line"' in text
    (x, y) = text_string_to_metric_families(text)
    assert x.name == "x" and x.type == "counter"
    assert x.documentation == "help with \\ and\nnewline"
    assert x.samples[0].labels == {"what": nasty} and x.samples[0].value == 2
    assert (y.type, y.samples[0].value) == ("gauge", 0.25)


def test_a_histogram_is_cumulative_with_inf_sum_and_count() -> None:
    hist = Histogram((1.0, 5.0))
    for value in (0.5, 2.0, 3.0, 100.0):
        hist.observe(value)
    text = ex.render([ex.histogram("lat_seconds", "latency", hist.cumulative(), hist.total)])
    (family,) = text_string_to_metric_families(text)
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got == {
        ("lat_seconds_bucket", "1.0"): 1,
        ("lat_seconds_bucket", "5.0"): 3,
        ("lat_seconds_bucket", "+Inf"): 4,
        ("lat_seconds_sum", None): 105.5,
        ("lat_seconds_count", None): 4,
    }


def test_two_workers_stats_add_up() -> None:
    one, two = Stats(started=100.0), Stats(started=50.0)
    one.files_taken, two.files_taken = 3, 4
    one.recipient("sent", "2.0.0", 1.0)
    one.recipient("bounced", "5.1.1", 2.0)
    two.recipient("sent", "2.6.0", 4000.0)
    two.recipient("deferred", "4.2.1")
    two.envelope_finished(0.5, now=60.0)
    both = added(one, two)
    assert both.started == 50.0 and both.files_taken == 7
    assert both.recipients == {("sent", "2"): 2, ("bounced", "5"): 1, ("deferred", "4"): 1}
    assert both.latency_histogram.count == 3 and both.latency_histogram.total == 4003.0
    assert both.latency(0.5) == 0.5
    # and the sum renders like any worker's
    samples = _samples(ex.render(families(both, Traffic(), Gauges())))
    assert _sent(samples, "sent", "2") == 2
    assert samples["spoolsmtp_delivery_latency_seconds_count", ()] == 3
    assert samples["spoolsmtp_envelopes_taken_total", ()] == 7


def test_the_endpoint_answers_only_get_and_head_of_metrics() -> None:
    async def scenario() -> list[bytes]:
        async def render() -> str:
            return "x_total 1\n"

        endpoint = MetricsEndpoint(render, f"127.0.0.1:{_free_port()}", "<test>")
        await endpoint.start()
        answers = []
        try:
            for request in (
                b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n",
                b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n",
                b"\x16\x03\x01 not http at all\r\n\r\n",
                b"GET /../etc/passwd HTTP/1.0\r\n\r\n",
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
                writer.write(request)
                answers.append(await reader.read())
                writer.close()
                await writer.wait_closed()
        finally:
            await endpoint.close()
        return answers

    get, head, garbage, elsewhere = asyncio.run(scenario())
    assert get.startswith(b"HTTP/1.0 200 OK\r\n") and get.endswith(b"\r\n\r\nx_total 1\n")
    assert b"Content-Length: 10\r\n" in get
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.0 400 ")
    assert elsewhere.startswith(b"HTTP/1.0 404 ")


def test_a_snapshot_crosses_a_pipe_as_json_and_still_adds_up() -> None:
    one = Stats(started=10.0)
    one.files_taken = 2
    one.recipient("sent", "2.0.0", 0.3)
    one.recipient("deferred", "4.4.1")
    one.envelope_finished(0.3, now=11.0)
    back = stats_from_dict(json.loads(json.dumps(stats_to_dict(one))))
    assert stats_to_dict(back) == stats_to_dict(one)
    twice = added(back, one)
    assert twice.recipients == {("sent", "2"): 2, ("deferred", "4"): 2}
    assert twice.latency_histogram.count == 2 and twice.files_taken == 4
