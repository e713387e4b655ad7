"""Which TLS each hop gets: the configured policy, raised by DANE (RFC 7672) or MTA-STS
(RFC 8461) where the destination publishes them.

For ``tls: dane`` (per route or ``delivery.tls``), each hop's TLSA records
(``_PORT._tcp.HOST``) are looked up when the MX answer was authenticated (a route's host is
looked up directly):

* authenticated usable records (usage 2 or 3): TLS is required and the certificate must match
  them (the session checks, ``smtp/dane.py``); no fallback to plain text;
* authenticated records none of which is usable: TLS is required, unauthenticated;
* no authenticated records (an unsigned zone, an insecure MX answer): as ``opportunistic``,
  and MTA-STS may still apply;
* the TLSA look-up failed (SERVFAIL, timeout): the hop is not tried now (section 2.1.1: an
  attacker able to block the look-up must not get plain text), 4.7.5.

The resolver caches TLSA answers (with their AD flag) for their TTL and failures not at all
(``MxResolver.lookup``), so a queue to one domain costs one query per host and TTL.

MTA-STS applies to MX deliveries (not routes) when ``delivery.mta_sts.enabled``: under an
``enforce`` policy a hop whose host the policy does not list is not tried, and a listed one
needs a certificate valid for its name (``verify``); a ``testing`` policy's mismatches are
only logged (once per domain and host). DANE wins where both apply (RFC 8461 section 2).
"""

from __future__ import annotations

from collections.abc import Callable

from spoolsmtp.delivery.mtasts import MtaSts, Policy
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.delivery.route import Destination
from spoolsmtp.model.config import Config, TlsPolicy
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.hop import Hop
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.model.tlsdemand import Tlsa, TlsDemand
from spoolsmtp.smtp import dane

HopTls = tuple[TlsPolicy, TlsDemand | None]


def parse_tlsa(text: str) -> Tlsa | None:
    """A TLSA record from its presentation form (``3 1 1 ab12...``), or None if malformed."""
    parts = text.split()
    if len(parts) < 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    try:
        data = bytes.fromhex("".join(parts[3:]))
    except ValueError:
        return None
    return Tlsa(int(parts[0]), int(parts[1]), int(parts[2]), data)


def require_dane_support(cfg: Config) -> None:
    """ConfigError naming the key when ``tls: dane`` is asked for without ``cryptography``."""
    keys: list[tuple[str, TlsPolicy | None]] = [("delivery.tls", cfg.delivery.tls)]
    keys += [(f"routes.{name}.tls", r.tls) for name, r in cfg.routes.items()]
    if cfg.smarthost is not None:
        keys.append(("smarthost.tls", cfg.smarthost.tls))
    for key, policy in keys:
        if policy is TlsPolicy.DANE and not dane.available():
            raise ConfigError(
                cfg.source, key, "dane needs the cryptography package (pip install spoolsmtp[dane])"
            )


class TlsPlanner:
    """Decides each hop's TLS (one per worker; MTA-STS policies are cached in ``sts``)."""

    def __init__(
        self,
        cfg: Config,
        resolver: MxResolver,
        warn: Callable[[str], None] | None = None,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.warn = warn
        self.trace = trace
        ca = cfg.delivery.tls_ca_file
        self.sts = MtaSts(cfg.delivery.mta_sts, resolver, str(ca) if ca else None, on_error=warn)
        self._testing_said: set[tuple[str, str]] = set()

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sts.cfg = cfg.delivery.mta_sts
        ca = cfg.delivery.tls_ca_file
        self.sts.ca_file = str(ca) if ca else None

    async def policy(self, dest: Destination) -> Policy | None:
        """The MTA-STS policy for an MX destination, when MTA-STS is on; else None."""
        if not self.cfg.delivery.mta_sts.enabled or dest.domain is None:
            return None
        if dest.domain.startswith("["):
            return None
        return await self.sts.policy(dest.domain)

    async def hop(
        self, dest: Destination, secure_mx: bool, policy: Policy | None, hop: Hop
    ) -> HopTls | Reply:
        """The TLS for ``hop``, or the reply that says why it must not be tried now."""
        base = dest.tls
        if dest.tls is TlsPolicy.DANE:
            base = TlsPolicy.OPPORTUNISTIC
            if dest.route is not None or secure_mx:
                decided = await self._dane(dest, hop)
                if decided is not None:
                    return decided
        if policy is None or policy.mode == "none" or dest.domain is None:
            return base, None
        if policy.allows(hop.host):
            if policy.enforced:
                return TlsPolicy.VERIFY, TlsDemand("mta-sts", names=(hop.host,))
            return base, None
        if policy.enforced:
            return make(
                451, "4.7.5", f"MTA-STS: {hop.host} is not an MX host of {dest.domain}'s policy"
            )
        if (dest.domain, hop.host) not in self._testing_said and self.warn is not None:
            self._testing_said.add((dest.domain, hop.host))
            self.warn(f"MTA-STS (testing) of {dest.domain}: {hop.host} is not in its policy")
        return base, None

    async def _dane(self, dest: Destination, hop: Hop) -> HopTls | Reply | None:
        name = f"_{hop.port}._tcp.{hop.host}"
        found = await self.resolver.lookup(name, "TLSA")
        if found.failure is not None:
            return make(451, "4.7.5", f"DANE: TLSA look-up of {name} failed ({found.failure})")
        if not found.secure or not found.records:
            self._trace(f"{name}: no authenticated TLSA records; TLS is opportunistic")
            return None
        records = tuple(r for r in map(parse_tlsa, found.records) if r is not None)
        usable = tuple(r for r in records if r.usable)
        if not usable:
            self._trace(f"{name}: no usable TLSA record; TLS required, not authenticated")
            return TlsPolicy.REQUIRED, None
        names = tuple(dict.fromkeys(n for n in (hop.host, dest.domain) if n))
        return TlsPolicy.DANE, TlsDemand("dane", usable, names)

    def _trace(self, text: str) -> None:
        if self.trace is not None:
            self.trace(f"tls: {text}")
