"""Routing: which next hop each recipient domain goes to (static route, smarthost, or DNS MX).

Pure: the same config and domain always give the same destination. Recipients are grouped by
destination so that each destination is one delivery with its own concurrency limit.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from spoolsmtp.model.config import Config, Route, TlsPolicy
from spoolsmtp.model.envelope import Recipient


@dataclass(frozen=True)
class Destination:
    """Where a group of recipients is sent.

    ``domain`` is set when the next hops come from DNS MX; ``route`` when they are fixed. ``key``
    names the destination for concurrency limits, the dead-host list and the operator.
    """

    key: str
    domain: str | None
    route: Route | None
    tls: TlsPolicy


def _literal(domain: str) -> str | None:
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        return inner[5:] if inner.lower().startswith("ipv6:") else inner
    return None


def find_route(domain: str, routes: dict[str, Route]) -> Route | None:
    """The static route for a domain: an exact key, else the longest matching ``*.suffix``."""
    domain = domain.lower().rstrip(".")
    lowered = {k.lower().rstrip("."): v for k, v in routes.items()}
    if domain in lowered:
        return lowered[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        wildcard = "*." + ".".join(labels[i:])
        if wildcard in lowered:
            return lowered[wildcard]
    return None


def destination_for(domain: str, cfg: Config) -> Destination:
    """Route one recipient domain: static route, smarthost, address literal, else DNS MX.

    A route or smarthost that names no port gets ``delivery.port``."""
    domain = domain.lower()
    default_tls = cfg.delivery.tls
    route = find_route(domain, cfg.routes) or cfg.smarthost
    if route is None:
        literal = _literal(domain)
        if literal is not None:
            ipaddress.ip_address(literal)
            route = Route(literal, cfg.delivery.port)
    if route is not None:
        if route.port is None:
            route = dataclasses.replace(route, port=cfg.delivery.port)
        key = f"[{route.host}]:{route.port}"
        return Destination(key, None, route, route.tls or default_tls)
    return Destination(domain, domain, None, default_tls)


class Router:
    """``destination_for`` remembered per domain: the worker asks for the same few domains
    many times per envelope. Bound to one config: a RELOAD builds a new Router."""

    REMEMBER = 10_000

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._known: dict[str, Destination] = {}

    def destination(self, domain: str) -> Destination:
        dest = self._known.get(domain)
        if dest is None:
            dest = destination_for(domain, self.cfg)
            if len(self._known) >= self.REMEMBER:
                self._known.clear()
            self._known[domain] = dest
        return dest

    def group(self, recipients: Iterable[Recipient]) -> dict[Destination, list[Recipient]]:
        """Recipients grouped by destination, in first-seen order."""
        out: dict[Destination, list[Recipient]] = {}
        for rcpt in recipients:
            out.setdefault(self.destination(rcpt.domain), []).append(rcpt)
        return out
