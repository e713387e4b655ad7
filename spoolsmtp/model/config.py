"""Configuration: YAML loaded once into typed, frozen values, every key checked.

The dataclasses below are the schema. Each field's type says what YAML value it takes; field
metadata says when a string is a duration (``20m``) or a size (``10MB``) and what range is allowed.
An unknown key, a wrong type or an impossible value raises ``ConfigError`` naming the file, the
dotted key and what was expected, so a typo such as ``retry.intervall`` stops start-up.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import os
import re
import socket
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.units import parse_duration, parse_size

DEFAULT_CONFIG = Path("conf/spoolsmtp.yaml")
SYSTEM_CONFIG = Path("/etc/spoolsmtp/spoolsmtp.yaml")


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
    """A static next hop for a domain: a host and port, with its own TLS policy."""

    host: str
    port: int = 25
    tls: TlsPolicy | None = None


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
    timeouts: Timeouts = field(default_factory=Timeouts)


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

    requeue: bool = False


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


@dataclass(frozen=True)
class SubmitConfig:
    """Defaults for ``spoolsmtp submit`` and the sendmail entry point."""

    sender: str = ""
    qualify_domain: str = ""


_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class WorkerConfig:
    """How the work is spread: processes on this host, and this host's name on a shared spool."""

    processes: int = field(default=1, metadata={"min": 1, "max": 64, "auto": True})
    host_id: str = field(default="", metadata={"name": True})


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
    retry: RetryConfig = field(default_factory=RetryConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    shutdown_timeout: float = _duration(30.0)
    user: str | None = None
    log_level: LogLevel = LogLevel.INFO
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


def load(path: Path | str | None = None) -> Config:
    """Read and check a YAML config file.

    ``None`` means: ``$SPOOLSMTP_CONFIG`` if set, else ``conf/spoolsmtp.yaml`` in the current
    folder, else ``/etc/spoolsmtp/spoolsmtp.yaml``, else the built-in defaults.
    """
    if path is None:
        env = os.environ.get("SPOOLSMTP_CONFIG")
        if env:
            path = Path(env)
        else:
            found = [p for p in (DEFAULT_CONFIG, SYSTEM_CONFIG) if p.exists()]
            if not found:
                return Config()
            path = found[0]
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse(text, name)


def parse(text: str, name: str = "<config>") -> Config:
    """Check YAML text against the schema and build the frozen ``Config``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(
            name, "", f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from exc
    if data is None:
        data = {}
    config: Config = _build(Config, data, name, "")
    try:
        codecs.lookup(config.spool.encoding)
    except LookupError:
        raise ConfigError(
            name, "spool.encoding", f"unknown encoding {config.spool.encoding!r}"
        ) from None
    return dataclasses.replace(config, source=name)


def _build(cls: type[Any], data: object, name: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "(top level)"
        raise ConfigError(name, where, f"expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(name, dotted, f"unknown key{hint}; known keys here: {known}")
        f = fields[key]
        kwargs[key] = _convert(hints[key], f.metadata, value, name, dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(name, prefix.rstrip(".") or "(top level)", str(exc)) from exc


def _convert(tp: Any, meta: typing.Mapping[str, Any], value: object, name: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _convert(inner[0], meta, value, name, key)
    try:
        if meta.get("unit") == "duration":
            result: Any = parse_duration(value)
        elif meta.get("unit") == "size":
            result = parse_size(value)
        elif tp is bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {_show(value)}")
            result = value
        elif tp is int and meta.get("auto") and value == "auto":
            result = os.cpu_count() or 1
        elif tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected a whole number, got {_show(value)}")
            result = value
        elif tp is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {_show(value)}")
            if meta.get("octal") and not re.fullmatch(r"0?[0-7]{3,4}", value):
                raise ValueError(f"expected an octal file mode such as '0660', got {value!r}")
            if meta.get("name") and value and not _HOST_ID.fullmatch(value):
                raise ValueError(
                    "expected a name of letters, digits, '.', '_' or '-' (at most 64), "
                    f"got {value!r}"
                )
            result = value
        elif tp is Path:
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a path, got {_show(value)}")
            result = Path(value)
        elif isinstance(tp, type) and issubclass(tp, Enum):
            choices = [m.value for m in tp]
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}, got {_show(value)}")
            result = tp(value)
        elif origin is tuple:
            if not isinstance(value, list):
                raise ValueError(f"expected a list, got {_show(value)}")
            return tuple(
                _convert(args[0], {}, item, name, f"{key}[{i}]") for i, item in enumerate(value)
            )
        elif origin is dict:
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {_show(value)}")
            return {str(k): _convert(args[1], {}, v, name, f"{key}.{k}") for k, v in value.items()}
        elif tp is Route:
            return _route(value, name, key)
        elif dataclasses.is_dataclass(tp):
            return _build(typing.cast(type[Any], tp), value, name, f"{key}.")
        else:
            raise ValueError(f"unsupported type {tp!r}")
    except ValueError as exc:
        raise ConfigError(name, key, str(exc)) from exc
    _check_range(meta, result, name, key)
    return result


def _check_range(meta: typing.Mapping[str, Any], value: Any, name: str, key: str) -> None:
    low = meta.get("min")
    high = meta.get("max")
    if low is not None and value < low:
        raise ConfigError(name, key, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(name, key, f"must be at most {high}, got {value}")


def _route(value: object, name: str, key: str) -> Route:
    """A route is ``host``, ``host:port``, ``[v6addr]:port`` or a mapping with host/port/tls."""
    if isinstance(value, str):
        host, port = split_hostport(value, name, key)
        return Route(host, port)
    route = _build(Route, value, name, f"{key}.")
    if not route.host:
        raise ConfigError(name, f"{key}.host", "expected a host name or address")
    _check_range({"min": 1, "max": 65535}, route.port, name, f"{key}.port")
    return typing.cast(Route, route)


def split_hostport(value: str, name: str = "<config>", key: str = "") -> tuple[str, int]:
    """``host``, ``host:port`` or ``[addr]:port`` into host and port (default 25)."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(name, key, f"expected host or host:port, got {value!r}")
    if not port_text:
        return host, 25
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(name, key, f"port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"
