"""The Prometheus text exposition format, version 0.0.4, written to its spec: ``# HELP`` and
``# TYPE`` lines, then the samples, label values escaped, histograms as cumulative ``_bucket``
samples with ``le`` (the last ``+Inf``), ``_sum`` and ``_count``. Pure: values in, text out.
(No client library at run time; the tests read the output with prometheus-client's parser.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    """One line: the family's name plus ``suffix`` (``_bucket``...), labels, value."""

    suffix: str
    labels: Labels
    value: float


@dataclass(frozen=True)
class Family:
    """One metric: name, type (counter, gauge, histogram), help text, samples."""

    name: str
    kind: str
    help: str
    samples: tuple[Sample, ...]


def counter(name: str, help: str, value: float, labels: Labels = ()) -> Family:
    """A counter without labels, or with one set of them; ``name`` ends in ``_total``."""
    return Family(name, "counter", help, (Sample("", labels, value),))


def gauge(name: str, help: str, value: float, labels: Labels = ()) -> Family:
    return Family(name, "gauge", help, (Sample("", labels, value),))


def labelled(kind: str, name: str, help: str, values: Mapping[Labels, float]) -> Family:
    """A counter or gauge with one sample per set of labels, in a stable order."""
    return Family(name, kind, help, tuple(Sample("", k, v) for k, v in sorted(values.items())))


def histogram(
    name: str, help: str, buckets: Sequence[tuple[float, int]], total: float, labels: Labels = ()
) -> Family:
    """``buckets``: (upper bound, cumulative count) in increasing order, the last ``inf``."""
    if not buckets or not math.isinf(buckets[-1][0]):
        raise ValueError("a histogram's last bucket is +Inf")
    samples = [Sample("_bucket", (*labels, ("le", _le(le))), n) for le, n in buckets]
    samples.append(Sample("_sum", labels, total))
    samples.append(Sample("_count", labels, buckets[-1][1]))
    return Family(name, "histogram", help, tuple(samples))


def render(families: Iterable[Family]) -> str:
    """The exposition: every family's HELP, TYPE and samples; ends with a newline."""
    out: list[str] = []
    for family in families:
        if not _NAME.fullmatch(family.name):
            raise ValueError(f"not a metric name: {family.name!r}")
        out.append(f"# HELP {family.name} {_escape_help(family.help)}")
        out.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            out.append(
                f"{family.name}{sample.suffix}{_labels(sample.labels)} {_value(sample.value)}"
            )
    return "\n".join(out) + "\n" if out else ""


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    for name, _ in labels:
        if not _LABEL.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"not a label name: {name!r}")
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels) + "}"


def escape_label(value: str) -> str:
    """A label value as the format writes it: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _le(bound: float) -> str:
    """A bucket's bound as Prometheus's own clients write it: ``1.0``, ``0.05``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _value(value: float) -> str:
    """A sample value (or ``le``) as the format writes it: integers without a point, +Inf,
    -Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))
