"""The configuration's schema: typed, frozen dataclasses, one per section of the YAML file.

Each field's type says what YAML value it takes; field metadata says when a string is a
duration (``20m``) or a size (``10MB``), what range is allowed, and which other check applies
(``octal``, ``name``, ``listen``, ``ids``, ``auto``). Reading and checking a file against it is
``config.py``'s (which also re-exports every name here, where callers import them from).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


def _duration(default: float, minimum: float = 0.0) -> Any:
    return field(default=default, metadata={"unit": "duration", "min": minimum})


def _size(default: int, minimum: int = 0) -> Any:
    return field(default=default, metadata={"unit": "size", "min": minimum})


def _count(default: int, minimum: int = 1, maximum: int | None = None) -> Any:
    return field(default=default, metadata={"min": minimum, "max": maximum})


class TlsPolicy(Enum):
    """STARTTLS toward remote servers, as Postfix's smtp_tls_security_level."""

    OFF = "off"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
    VERIFY = "verify"
    DANE = "dane"


class TlsVersion(Enum):
    """The oldest TLS version accepted toward remote servers (``delivery.tls_min_version``)."""

    TLSV1 = "TLSv1"
    TLSV1_1 = "TLSv1.1"
    TLSV1_2 = "TLSv1.2"
    TLSV1_3 = "TLSv1.3"


class EventLoop(Enum):
    """Which asyncio event loop runs the worker (``auto``: uvloop where it is installed)."""

    AUTO = "auto"
    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


class LogLevel(Enum):
    """How much the worker logs."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(Enum):
    """How each log line is written: text, or one JSON object a line (same fields)."""

    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True)
class SpoolConfig:
    """Where the spool lives and how files are taken from ``incoming/``."""

    path: Path = Path("spool")
    settle_seconds: float = _duration(2.0)
    rescan_interval: float = _duration(60.0, 0.01)
    max_file_bytes: int = _size(1024**3, 1)
    max_active: int = _count(200)
    encoding: str = "utf-8"
    strip_trailing_blanks: bool = False
    record_length: int = _count(0, 0, 32760)
    min_free_space: int = _size(64 * 1024**2)
    min_free_inodes: int = _count(1000, 0)
    incoming: Path | None = None
    active: Path | None = None
    deferred: Path | None = None
    hold: Path | None = None
    done: Path | None = None
    results: Path | None = None
    bounces: Path | None = None
    rejected: Path | None = None
    deadletter: Path | None = None
    journal: Path | None = None

    def folder(self, name: str) -> Path:
        """A spool folder: its own setting if given, else ``path/name``."""
        override: Path | None = getattr(self, name)
        return override if override is not None else self.path / name


@dataclass(frozen=True)
class Limits:
    """SMTP limits applied to every command of an envelope (RFC 5321 section 4.5.3.1)."""

    command_line: int = _count(512, 16)
    text_line: int = _count(1000, 80)
    local_part: int = _count(64)
    domain: int = _count(255)
    path: int = _count(256)
    recipients: int = _count(1000)
    recipients_per_file: int = _count(50_000)
    transactions_per_file: int = _count(10_000)
    commands_per_file: int = _count(100_000)
    max_message_bytes: int = _size(50 * 1000**2, 1)
    max_hops: int = _count(100)


@dataclass(frozen=True)
class Timeouts:
    """Per-command timeouts toward remote servers (RFC 5321 section 4.5.3.2)."""

    connect: float = _duration(30.0, 0.001)
    greeting: float = _duration(300.0, 0.001)
    ehlo: float = _duration(300.0, 0.001)
    starttls: float = _duration(120.0, 0.001)
    mail: float = _duration(300.0, 0.001)
    rcpt: float = _duration(300.0, 0.001)
    data: float = _duration(120.0, 0.001)
    data_block: float = _duration(180.0, 0.001)
    data_end: float = _duration(600.0, 0.001)
    quit: float = _duration(10.0, 0.001)


@dataclass(frozen=True)
class Route:
    """A static next hop for a domain: a host and port, with its own TLS policy. No port:
    ``delivery.port``. ``auth`` names an entry of ``delivery.auth_file`` to log in with."""

    host: str
    port: int | None = None
    tls: TlsPolicy | None = None
    auth: str | None = None
    auth_plaintext: bool = False


@dataclass(frozen=True)
class MtaStsConfig:
    """MTA-STS (RFC 8461): recipient domains' policies, fetched over HTTPS and cached."""

    enabled: bool = False
    timeout: float = _duration(10.0, 0.001)
    max_policy_bytes: int = _size(64 * 1024, 256)
    cache_size: int = _count(10_000)


@dataclass(frozen=True)
class DeliveryConfig:
    """How mail is sent to remote servers."""

    port: int = _count(25, 1, 65535)
    max_connections: int = _count(100)
    max_per_destination: int = _count(20)
    reuse_connections: bool = True
    idle_timeout: float = _duration(30.0)
    max_addresses: int = _count(5)
    pipelining: bool = True
    tls: TlsPolicy = TlsPolicy.OPPORTUNISTIC
    tls_ca_file: Path | None = None
    tls_min_version: TlsVersion = TlsVersion.TLSV1_2
    auth_file: Path | None = None
    mime_conversion: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)


@dataclass(frozen=True)
class DkimKey:
    """How mail from one sender domain is signed: the selector and its private key (PEM)."""

    selector: str
    key_file: Path


@dataclass(frozen=True)
class DnsConfig:
    """The resolver used for MX and address look-ups."""

    nameservers: tuple[str, ...] = ()
    port: int = _count(53, 1, 65535)
    timeout: float = _duration(5.0, 0.001)
    lifetime: float = _duration(15.0, 0.001)
    allow_loopback: bool = False
    allow_private: bool = True
    max_mx: int = _count(10)
    max_queries: int = _count(50)
    max_ttl: float = _duration(86400.0)
    cache_size: int = _count(10000)


@dataclass(frozen=True)
class RetryConfig:
    """When deferred recipients are tried again, and when they are given up."""

    interval: float = _duration(1200.0, 0.001)
    max_interval: float = _duration(4 * 3600.0, 0.001)
    max_age: float = _duration(3 * 86400.0, 0.001)
    warning_age: float = _duration(4 * 3600.0, 0.0)
    dead_destination: float = _duration(300.0, 0.0)


@dataclass(frozen=True)
class BouncesConfig:
    """Non-delivery reports, delay warnings and batch error reports."""

    requeue: bool = True


@dataclass(frozen=True)
class ControlConfig:
    """The operator's control socket."""

    socket: Path | None = None
    mode: str = field(default="0666", metadata={"octal": True})
    group: str | None = None
    authorized_users: tuple[str, ...] = ()
    authorized_groups: tuple[str, ...] = ()
    max_line: int = _size(4096, 64)
    idle_timeout: float = _duration(60.0, 0.01)
    max_connections_per_uid: int = _count(8)
    backlog: int = _count(512, 1, 65535)
    operator_socket: Path | None = None
    operator_group: str | None = None

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


class SenderPolicy(Enum):
    """Which MAIL FROM addresses a submitter may use (``submit.sender_policy``)."""

    ANY = "any"
    OWNER = "owner"


_IDS = {"ids": True}  # list items that may be names or numbers


@dataclass(frozen=True)
class SubmitConfig:
    """Defaults for ``spoolsmtp submit`` and the sendmail entry point, and who may send what
    (the owner of each envelope file, as the VM server's RESTRICT and Postfix's
    authorized_submit_users and sender login maps)."""

    sender: str = ""
    qualify_domain: str = ""
    group: str = ""  # the submitters' group: incoming/ and results/ opened to it (dropbox.py)
    allowed_users: tuple[str, ...] = field(default=(), metadata=_IDS)
    allowed_groups: tuple[str, ...] = field(default=(), metadata=_IDS)
    restrict: tuple[str, ...] = ()
    sender_policy: SenderPolicy = SenderPolicy.ANY
    senders: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class NetdataConfig:
    """NETDATA files (TSO TRANSMIT, CMS SENDFILE/NOTE) in incoming/: their code page, and the
    domain of each VM/RSCS node named in a note (``USER at NODE``)."""

    codepage: str = "cp037"
    nodes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RewriteConfig:
    """Address rewriting of what comes in, envelope and header (VM's REWRITE822HEADER; Postfix's
    canonical, generic and masquerade): see bsmtp/rewrite.py."""

    qualify_domain: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    nicknames: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: ``listen`` is ``host:port`` (null: none)."""

    listen: str | None = field(default=None, metadata={"listen": True})


@dataclass(frozen=True)
class WorkerConfig:
    """How the work is spread: processes on this host, and this host's name on a shared spool."""

    processes: int = field(default=1, metadata={"min": 1, "max": 64, "auto": True})
    host_id: str = field(default="", metadata={"name": True})
    # a delivery process that answers nothing this long is killed and started again (0: never)
    watchdog: float = _duration(30.0)


@dataclass(frozen=True)
class Config:
    """The whole configuration of one spoolsmtp instance."""

    hostname: str = ""
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    limits: Limits = field(default_factory=Limits)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    routes: dict[str, Route] = field(default_factory=dict)
    smarthost: Route | None = None
    dkim: dict[str, DkimKey] = field(default_factory=dict)
    retry: RetryConfig = field(default_factory=RetryConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    netdata: NetdataConfig = field(default_factory=NetdataConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    shutdown_timeout: float = _duration(30.0)
    user: str | None = None
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.TEXT
    event_loop: EventLoop = EventLoop.AUTO
    source: str = field(default="(defaults)", metadata={"internal": True})

    @property
    def helo_name(self) -> str:
        return self.hostname or socket.getfqdn()

    @property
    def control_socket(self) -> Path:
        return self.control.socket or self._node_root / "control.sock"

    @property
    def operator_socket(self) -> Path:
        return self.control.operator_socket or self._node_root / "operator" / "control.sock"

    @property
    def _node_root(self) -> Path:
        """Where this host's own files go: the spool, or its node area on a shared spool."""
        host = self.worker.host_id
        return self.spool.path / "nodes" / host if host else self.spool.path
