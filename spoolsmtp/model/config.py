"""Configuration: YAML loaded once into the typed, frozen values of ``schema.py``, every key
checked.

An unknown key, a wrong type or an impossible value raises ``ConfigError`` naming the file, the
dotted key and what was expected, so a typo such as ``retry.intervall`` stops start-up.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import os
import re
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from spoolsmtp.model import codepages  # noqa: F401 - registers cp1047
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.schema import (
    BouncesConfig,
    Config,
    ControlConfig,
    DeliveryConfig,
    DkimKey,
    DnsConfig,
    EventLoop,
    Limits,
    LogFormat,
    LogLevel,
    MetricsConfig,
    MtaStsConfig,
    NetdataConfig,
    RetryConfig,
    RewriteConfig,
    Route,
    SenderPolicy,
    SpoolConfig,
    SubmitConfig,
    Timeouts,
    TlsPolicy,
    TlsVersion,
    WorkerConfig,
)
from spoolsmtp.model.units import parse_duration, parse_size

__all__ = [
    "DEFAULT_CONFIG",
    "SYSTEM_CONFIG",
    "BouncesConfig",
    "Config",
    "ControlConfig",
    "DeliveryConfig",
    "DkimKey",
    "DnsConfig",
    "EventLoop",
    "Limits",
    "LogFormat",
    "LogLevel",
    "MetricsConfig",
    "MtaStsConfig",
    "NetdataConfig",
    "RetryConfig",
    "RewriteConfig",
    "Route",
    "SenderPolicy",
    "SpoolConfig",
    "SubmitConfig",
    "Timeouts",
    "TlsPolicy",
    "TlsVersion",
    "WorkerConfig",
    "listen_address",
    "load",
    "parse",
    "split_hostport",
]

DEFAULT_CONFIG = Path("conf/spoolsmtp.yaml")
SYSTEM_CONFIG = Path("/etc/spoolsmtp/spoolsmtp.yaml")
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
    for key, encoding in (
        ("spool.encoding", config.spool.encoding),
        ("netdata.codepage", config.netdata.codepage),
    ):
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ConfigError(name, key, f"unknown encoding {encoding!r}") from None
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
            if meta.get("id") and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # a uid or gid given as a number
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {_show(value)}")
            if meta.get("octal") and not re.fullmatch(r"0?[0-7]{3,4}", value):
                raise ValueError(f"expected an octal file mode such as '0660', got {value!r}")
            if meta.get("name") and value and not _HOST_ID.fullmatch(value):
                raise ValueError(
                    "expected a name of letters, digits, '.', '_' or '-' (at most 64), "
                    f"got {value!r}"
                )
            if meta.get("listen"):
                listen_address(value, name, key)
            result = value
        elif tp is Path:
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a path, got {_show(value)}")
            result = Path(value)
        elif isinstance(tp, type) and issubclass(tp, Enum):
            choices = [m.value for m in tp]
            if value is False and "off" in choices:
                value = "off"  # YAML 1.1 reads a bare off (or no, false) as false
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}, got {_show(value)}")
            result = tp(value)
        elif origin is tuple:
            if not isinstance(value, list):
                raise ValueError(f"expected a list, got {_show(value)}")
            inner_meta = {"id": True} if meta.get("ids") else {}
            return tuple(
                _convert(args[0], inner_meta, item, name, f"{key}[{i}]")
                for i, item in enumerate(value)
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
    if route.port is not None:
        _check_range({"min": 1, "max": 65535}, route.port, name, f"{key}.port")
    return typing.cast(Route, route)


def split_hostport(value: str, name: str = "<config>", key: str = "") -> tuple[str, int | None]:
    """``host``, ``host:port`` or ``[addr]:port`` into host and port (None: not given)."""
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
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(name, key, f"port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


def listen_address(value: str, name: str = "<config>", key: str = "") -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` to listen on, both given."""
    text = value.strip()
    bare_v6 = text.count(":") > 1 and not text.startswith("[")
    if bare_v6 or not re.search(r"[^:]:\d+$", text):
        raise ConfigError(name, key, f"expected host:port or [addr]:port, got {value!r}")
    host, port = split_hostport(text, name, key)
    assert port is not None  # the pattern above wants one
    return host, port


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


def dump(config: Config) -> dict[str, Any]:
    """The configuration as YAML data that ``parse`` reads back to an equal ``Config``: what a
    supervisor hands its delivery processes, so that one started again runs on the
    configuration the whole runs on (the file may have been edited meanwhile, for the next
    restart, or broken)."""
    data: dict[str, Any] = _dumped(config)
    return data


def dumps(config: Config) -> str:
    """``dump`` as YAML text."""
    return yaml.safe_dump(dump(config), sort_keys=False, allow_unicode=True)


def _dumped(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _dumped(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get("internal")
        }
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_dumped(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _dumped(v) for k, v in value.items()}
    return value
