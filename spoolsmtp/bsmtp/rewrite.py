"""Address rewriting, pure (VM's REWRITE822HEADER; Postfix's canonical, generic and masquerade).

* ``qualify_domain``: an address with no domain (``OPERATOR``, as old jobs wrote RCPT TO) gets
  one, after the nickname table had its say.
* ``nicknames``: the NAMES file's nicknames to mailboxes (``OPS: ops-team@example.com``), for an
  address with no domain; compared without regard to case.
* ``addresses``: ``user@domain`` (exact), ``@domain`` (every address of the domain; the
  replacement is ``@newdomain``, keeping the local part, or a whole address) or the VM form
  ``user at node`` to its replacement; keys compared without regard to case.

A rewrite is resolved to its end once (``a -> b -> c`` gives ``c``), at most ``MAX_CHAIN``
steps; a loop or a longer chain leaves the address as it was. So rewriting what was rewritten
changes nothing more, and a file rewritten once and read again is read the same.

In a message only the address fields of the header (From, To, Cc, Reply-To, Sender) change,
and in them only the addresses that are rewritten: display names, quoted strings, comments,
groups and folding stay byte for byte, and the body is never looked at.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from spoolsmtp.bsmtp.compose import fields, split

MAX_CHAIN = 5
FIELDS = frozenset({"from", "to", "cc", "reply-to", "sender"})
_VM = re.compile(r"([^\s@<>]+)\s+at\s+([^\s@<>]+)", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")


def _key(text: str) -> str:
    """A map key or an address in the form keys are compared in: ``user at node`` as
    ``user@node``, lower case."""
    text = text.strip()
    vm = _VM.fullmatch(text)
    if vm:
        text = f"{vm.group(1)}@{vm.group(2)}"
    return text.lower()


@dataclass(frozen=True)
class Rewriter:
    """The configured rewriting; ``active`` is False when there is nothing to do."""

    qualify_domain: str = ""
    addresses: Mapping[str, str] = field(default_factory=dict)
    nicknames: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", {_key(k): v for k, v in self.addresses.items()})
        object.__setattr__(
            self, "nicknames", {k.strip().lower(): v for k, v in self.nicknames.items()}
        )

    @property
    def active(self) -> bool:
        return bool(self.qualify_domain or self.addresses or self.nicknames)

    def _step(self, address: str) -> str | None:
        """One rule applied to ``address``, or None when none applies."""
        key = _key(address)
        if "@" not in key:
            nick = self.nicknames.get(key)
            if nick is not None:
                return nick
            if self.qualify_domain:
                return f"{address.strip()}@{self.qualify_domain}"
            return None
        hit = self.addresses.get(key)
        if hit is not None:
            return hit
        local, _, domain = key.rpartition("@")
        hit = self.addresses.get(f"@{domain}")
        if hit is None:
            return None
        if hit.startswith("@"):
            vm = _VM.fullmatch(address.strip())
            written = vm.group(1) if vm else address.strip().rpartition("@")[0]
            return f"{written or local}{hit}"
        return hit

    def address(self, address: str) -> str:
        """``address`` rewritten to the end of its chain ("" and unchanged ones as they are)."""
        if not address or not self.active:
            return address
        seen = {_key(address)}
        current = address
        for _ in range(MAX_CHAIN):
            nxt = self._step(current)
            if nxt is None or _key(nxt) == _key(current):
                return current
            if _key(nxt) in seen:
                return address  # a loop: leave it
            seen.add(_key(nxt))
            current = nxt
        return current if self._step(current) is None else address

    def unqualified(self, local: str) -> str | None:
        """For the reader: what an address with no domain stands for (None: refuse it)."""
        out = self.address(local)
        return out if "@" in out else None

    # -- messages ----------------------------------------------------------------------------

    def message(self, message: bytes) -> bytes:
        """The message with the addresses of its header rewritten; the body untouched."""
        head, blank, body = split(message)
        found = fields(head)
        if not any(name in FIELDS for name, _ in found):
            return message
        out = b"".join(self.field(raw) if name in FIELDS else raw for name, raw in found)
        return out + blank + body

    def field(self, raw: bytes) -> bytes:
        """One address field with each rewritten address replaced where it stands."""
        name, colon, value = raw.partition(b":")
        text = value.decode("utf-8", "surrogateescape")
        changed = text
        for start, end in reversed(spans(text)):
            written = text[start:end]
            new = self.address(written)
            if new != written:
                changed = changed[:start] + new + changed[end:]
        if changed == text:
            return raw
        return name + colon + changed.encode("utf-8", "surrogateescape")


def spans(text: str) -> list[tuple[int, int]]:
    """Where the addresses are in an address list: the inside of each ``<...>``, else each
    entry written bare (an addr-spec, ``user at node``, or a lone word), trimmed of white
    space. Quoted strings, comments and group names are never taken for addresses; an entry
    with a comment in the middle of its address is left alone."""
    out: list[tuple[int, int]] = []
    depth = 0
    quoted = escaped = False
    angle = -1
    entry: list[tuple[int, int]] = []  # runs of text outside comments, of the current entry
    has_angle = False
    comment_in = False
    run_start = -1

    def close_run(i: int) -> None:
        nonlocal run_start
        if run_start >= 0:
            entry.append((run_start, i))
            run_start = -1

    def close_entry() -> None:
        nonlocal entry, has_angle, comment_in
        if not has_angle and entry:
            start, end = entry[0][0], entry[-1][1]
            candidate = text[start:end].strip()
            lead = len(text[start:end]) - len(text[start:end].lstrip())
            plain = len(entry) == 1 or not comment_in
            if plain and candidate and _bare(candidate):
                out.append((start + lead, start + lead + len(candidate)))
        entry, has_angle, comment_in = [], False, False

    for i, ch in enumerate(text):
        if escaped:
            escaped = False
            continue
        if quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if depth:
            if ch == "\\":
                escaped = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0 and entry:
                    comment_in = True
            continue
        if angle >= 0:
            if ch == ">":
                out.append((angle + 1, i))
                angle = -1
            continue
        if ch == "(":
            close_run(i)
            depth = 1
        elif ch == '"':
            if run_start < 0:
                run_start = i
            quoted = True
        elif ch == "<":
            close_run(i)
            angle, has_angle = i, True
        elif ch in ",;":
            close_run(i)
            close_entry()
        elif ch == ":":
            run_start = -1
            entry, has_angle, comment_in = [], False, False  # a group's name: not an address
        elif run_start < 0 and not ch.isspace():
            run_start = i
    close_run(len(text))
    close_entry()
    return out


def _bare(candidate: str) -> bool:
    """An entry written without angle brackets that is an address: ``local@domain``,
    ``user at node``, or one word (an address with no domain)."""
    if _VM.fullmatch(candidate):
        return True
    if " " in candidate.replace("\\ ", "") and not candidate.startswith('"'):
        return False
    local, at, domain = candidate.rpartition("@")
    if at:
        return bool(local) and bool(domain) and " " not in domain
    return bool(_WORD.fullmatch(candidate))
