"""Human units in configuration: durations such as ``20m`` or ``500ms``, sizes such as ``10MB``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|k|kib|mb|m|mib|gb|g|gib|tb|tib)?\s*$", re.I)
_SIZE_UNITS = {
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_duration(value: object) -> float:
    """Seconds from ``20m``, ``3d``, ``500ms``, ``1.5h`` or a bare number of seconds.

    Raises ValueError with the expected form on anything else.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 20m, 3d or 500ms")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    raise ValueError(f"expected a duration such as 30s, 20m, 3d or 500ms, got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from ``10MB``, ``512KiB``, ``1GB`` or a bare number (decimal units are 1000)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512, 64KB or 10MB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    raise ValueError(f"expected a size such as 512, 64KB or 10MB, got {value!r}")


def format_duration(seconds: float) -> str:
    """The shortest exact unit form of a duration, for messages and the sample config."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"
