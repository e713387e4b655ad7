"""Where one delivery attempt goes (a host, its address and port), and who wants its trace.

Values shared by the layers that find hops (routing and DNS) and those that use them (the SMTP
session), so that neither imports the other; and the default tracing predicate, shared by the
resolver and the session, which imports nothing of the operator channel.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hop:
    """One address to try: the MX (or route) host name, its address, and the port."""

    host: str
    address: str
    port: int = 25


def always() -> bool:
    """The default ``tracing`` predicate of the resolver and of sessions: whoever gave them a
    trace function wants every line (the worker passes one that asks its ``Tracer``)."""
    return True
