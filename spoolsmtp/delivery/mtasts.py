"""MTA-STS (RFC 8461): a recipient domain's published policy, fetched over HTTPS and cached.

A domain opts in with a TXT record ``_mta-sts.DOMAIN`` (``v=STSv1; id=...``) and a policy at
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``::

    version: STSv1
    mode: enforce            (or testing, or none)
    mx: mail.example.com
    mx: *.example.net
    max_age: 604800

The policy is fetched with a verified certificate for ``mta-sts.DOMAIN`` (the trusted CAs, or
``delivery.tls_ca_file``), no redirects, a 200 with ``text/plain``, at most
``max_policy_bytes``, within ``timeout``; the host's address comes from our own resolver, so
routes and tests stay on the configured DNS. The policy is kept for its ``max_age`` and fetched
again only when the TXT record's id changes (section 5.1; the resolver keeps the TXT answer for
its TTL, so a new id is seen once that has run out); while one is cached and unexpired, a
missing TXT record or a failed fetch leaves it in force (section 5). A domain with no policy,
or whose policy cannot be had, is delivered to as if it had none (section 5).
"""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.config import MtaStsConfig

MAX_AGE_LIMIT = 31_557_600  # one year (section 3.2)
PORT = 443
_KEY = re.compile(r"^([A-Za-z0-9_]+):[ \t]*(.*?)[ \t]*$")
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(ValueError):
    """A policy or TXT record that is not one: ignored as if absent, and said once."""


@dataclass(frozen=True)
class Policy:
    """A domain's policy: ``mode`` enforce | testing | none, the MX ``patterns``, and how
    long it may be kept (seconds), with the TXT id it was fetched under."""

    mode: str
    patterns: tuple[str, ...]
    max_age: int
    id: str = ""

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"

    def allows(self, host: str) -> bool:
        return any(mx_matches(host, p) for p in self.patterns)


def parse_txt(records: tuple[str, ...]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None if none is an STSv1 record.
    More than one STSv1 record is an error (section 3.1): treated as none."""
    ids: list[str] = []
    for text in records:
        joined = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', text)) or text
        fields = [f.strip() for f in joined.split(";") if f.strip()]
        if not fields or fields[0] != "v=STSv1":
            continue
        found = [f[3:] for f in fields[1:] if f.startswith("id=")]
        if len(found) != 1 or not _ID.match(found[0]):
            raise PolicyError(f"TXT record without a valid id: {joined!r}")
        ids.append(found[0])
    if len(ids) > 1:
        raise PolicyError("more than one STSv1 TXT record")
    return ids[0] if ids else None


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """A policy body (section 3.2): CRLF or LF lines of ``key: value``; unknown keys ignored."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _KEY.match(line)
        if match is None:
            raise PolicyError(f"not a 'key: value' line: {line[:60]!r}")
        values.setdefault(match.group(1), []).append(match.group(2))
    if values.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (values.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    age_text = (values.get("max_age") or [""])[0]
    if not age_text.isdigit() or len(age_text) > 10:
        raise PolicyError(f"max_age {age_text!r} is not a number of seconds")
    patterns = tuple(p.lower().rstrip(".") for p in values.get("mx", []))
    if mode != "none" and not patterns:
        raise PolicyError("no mx line")
    return Policy(mode, patterns, min(int(age_text), MAX_AGE_LIMIT), policy_id)


def mx_matches(host: str, pattern: str) -> bool:
    """An MX host against one ``mx`` pattern: equal, or ``*.`` standing for exactly one
    leftmost label (section 4.1); without regard to case or a final dot."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return host == pattern


class _Pinned(http.client.HTTPSConnection):
    """HTTPS to a given address, with the certificate checked for the policy host's name."""

    def __init__(self, host: str, address: str, timeout: float, ctx: ssl.SSLContext) -> None:
        super().__init__(host, PORT, timeout=timeout, context=ctx)
        self._address = address
        self._ctx = ctx

    def connect(self) -> None:
        raw = socket.create_connection((self._address, PORT), self.timeout)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)


def fetch(host: str, address: str, cfg: MtaStsConfig, ca_file: str | None) -> str:
    """GET the policy (blocking: run in a thread); PolicyError saying why it is not had."""
    ctx = ssl.create_default_context(cafile=ca_file)
    conn = _Pinned(host, address, cfg.timeout, ctx)
    try:
        conn.request("GET", "/.well-known/mta-sts.txt", headers={"User-Agent": "spoolsmtp"})
        with conn.getresponse() as response:
            if response.status != 200:
                raise PolicyError(f"https://{host}/ answered {response.status} {response.reason}")
            kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "text/plain":
                raise PolicyError(f"https://{host}/ sent {kind or 'no type'}, not text/plain")
            body = response.read(cfg.max_policy_bytes + 1)
        if len(body) > cfg.max_policy_bytes:
            raise PolicyError(f"policy longer than {cfg.max_policy_bytes} bytes")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError("policy is not UTF-8 text") from None
    except (OSError, http.client.HTTPException) as exc:
        raise PolicyError(f"https://{host}/: {getattr(exc, 'reason', None) or exc}") from exc
    finally:
        conn.close()


class MtaSts:
    """Policies of recipient domains, cached for their ``max_age``; one per worker."""

    def __init__(
        self,
        cfg: MtaStsConfig,
        resolver: MxResolver,
        ca_file: str | None,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.ca_file = ca_file
        self.clock = clock
        self.on_error = on_error
        self._cache: dict[str, tuple[float, Policy]] = {}
        self._said: set[str] = set()

    async def policy(self, domain: str) -> Policy | None:
        """The domain's policy in force, or None (no policy, or none to be had)."""
        domain = domain.lower().rstrip(".")
        now = self.clock()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] <= now:
            del self._cache[domain]
            cached = None
        kept = cached[1] if cached is not None else None
        txt = await self.resolver.lookup(f"_mta-sts.{domain}", "TXT")
        if txt.failure is not None:
            return kept
        try:
            policy_id = parse_txt(txt.records)
        except PolicyError as exc:
            self._error(domain, str(exc))
            return kept
        if policy_id is None or (kept is not None and kept.id == policy_id):
            return kept
        try:
            fresh = await self._fetch(domain, policy_id)
        except PolicyError as exc:
            self._error(domain, str(exc))
            return kept
        self._said.discard(domain)
        if len(self._cache) >= self.cfg.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[domain] = (now + fresh.max_age, fresh)
        return fresh

    async def _fetch(self, domain: str, policy_id: str) -> Policy:
        host = f"mta-sts.{domain}"
        addresses = await self.resolver.addresses(host)
        if not addresses:
            raise PolicyError(f"{host} has no address")
        try:
            text = await asyncio.wait_for(
                asyncio.to_thread(fetch, host, addresses[0], self.cfg, self.ca_file),
                self.cfg.timeout + 1.0,
            )
        except TimeoutError:
            raise PolicyError(f"https://{host}/ did not answer in time") from None
        return parse_policy(text, policy_id)

    def _error(self, domain: str, why: str) -> None:
        """Said once per domain until a policy is had again, never per message."""
        if domain not in self._said and self.on_error is not None:
            self._said.add(domain)
            self.on_error(f"MTA-STS policy of {domain}: {why}; delivering as without one")
