"""The reader's shortcuts for the usual command line agree with the general rules they skip.

Each shortcut (a domain matched whole, a path without quotes split at its first '>', an echo
with nothing to escape) is checked against the rule written out plainly, over generated text
rich in the characters that make the general rule work: dots, hyphens, quotes, backslashes,
newlines, control and non-ASCII characters.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from spoolsmtp.bsmtp import address, batchreply, params
from spoolsmtp.model.config import Limits

_DOMAINISH = st.text(alphabet="ab09-._\n é\u200b[]", max_size=70)
_PATHISH = st.text(alphabet='<>"\\ a@b.:,', max_size=30).map(lambda s: "<" + s)
_LINEISH = st.binary(max_size=40).map(lambda b: b + "é\x01\x1b\t\x7f\x85".encode())


def _label_rule(domain: str) -> bool:
    """The rule as the reader had it: each dot-separated label matches ``_LABEL`` on its own."""
    return bool(domain) and all(address._LABEL.match(label) for label in domain.split("."))


@settings(max_examples=1000)
@given(
    st.one_of(_DOMAINISH, st.lists(st.sampled_from(["a", "-", "é", "0"]), max_size=70).map("".join))
)
def test_a_domain_is_valid_exactly_when_each_label_is(domain: str) -> None:
    if domain.startswith("[") and domain.endswith("]"):
        return  # an address literal, checked by ipaddress
    fault = address.check_domain(domain, "recipient", "5.1.3")
    assert (fault is None) == _label_rule(domain)


def test_a_label_of_64_characters_is_refused_whole_or_label_by_label() -> None:
    for domain in ("a" * 63 + ".org", "a" * 64 + ".org", "x." + "b" * 64, "a-.b", "a.-b", "a..b"):
        assert (address.check_domain(domain, "r", "5.1.3") is None) == _label_rule(domain)


@settings(max_examples=1000)
@given(_PATHISH)
def test_a_path_is_split_where_walking_its_quotes_would_split_it(text: str) -> None:
    assert params.split_path(text) == params.split_at_close(text)


def _echo_rule(content: bytes, limit: int) -> str:
    text = content[:limit].decode("utf-8", "backslashreplace")
    return re.sub("[\x00-\x08\x0a-\x1f]", lambda m: f"\\x{ord(m.group()):02x}", text)


@settings(max_examples=1000)
@given(_LINEISH, st.integers(1, 60))
def test_an_echo_is_the_same_whether_the_line_came_decoded_or_not(
    content: bytes, limit: int
) -> None:
    try:
        text: str | None = content.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    want = _echo_rule(content, limit)
    assert batchreply.echo(content, limit) == want
    assert batchreply.echo(content, limit, text) == want


@settings(max_examples=500)
@given(
    st.sampled_from(["", "@r.s:", "@q,@s:", "@t:", "@r", "@:", "x@r:"]),
    st.sampled_from(["a@b.c", "a"]),
)
def test_a_source_route_is_dropped_only_where_it_leads_the_path(route: str, rest: str) -> None:
    mailbox, fault = address.parse_path(f"<{route}{rest}>", Limits(), sender=False, utf8=False)
    inner = re.sub(r"^@[^:,]+(?:,@[^:,]+)*:", "", route + rest, count=1)
    local, at, domain = inner.rpartition("@")
    if at and local == "a" and domain == "b.c":
        assert fault is None and str(mailbox) == "a@b.c"
    else:
        assert mailbox is None and fault is not None


_ADDRESSISH = st.text(alphabet='ab.-_@<>"\\[]:é +', max_size=30).map(lambda s: f"<{s}>")
_SMALL = Limits(path=16, local_part=6, domain=10)
_EDGES = [
    "<a@b@c.d>",
    "<a@" + "b" * 63 + ".c>",
    "<a@" + "b" * 64 + ".c>",
    "<a..b@c.d>",
    "<.a@c.d>",
    "<a.@c.d>",
    "<a@c..d>",
    "<a@-c.d>",
    "<a@c-.d>",
    "<a@c.d.>",
    "<a@.c.d>",
    "<a b@c.d>",
    '<"a"@c.d>',
    "<a@[1.2.3.4]>",
    "<@r:a@c.d>",
    "<a@c.d> SIZE=1",
    "<abcdef@abcdefg.h>",
    "<a#b!c@d-1.e2>",
]


@settings(max_examples=2000)
@given(
    st.one_of(
        _ADDRESSISH,
        st.from_regex(r"<[a-z.\-]{1,8}@[a-z0-9.\-]{1,12}>", fullmatch=True),
        st.sampled_from(_EDGES),
    ),
    st.sampled_from([Limits(), _SMALL]),
    st.booleans(),
    st.booleans(),
)
def test_a_plain_path_is_one_the_general_parse_accepts_as_the_same_mailbox(
    text: str, limits: Limits, sender: bool, utf8: bool
) -> None:
    plain = address.plain_path(text, limits)
    mailbox, fault = address.parse_path(text, limits, sender=sender, utf8=utf8)
    if plain is not None:
        assert (mailbox, fault) == (plain, None)
        assert params.split_path(text) == (text, "")  # no parameters follow it


def test_the_usual_paths_are_plain_and_those_at_a_limit_are_left_to_the_general_parse() -> None:
    for text in ("<bench@example.com>", "<r3-0@example.org>", "<a.b+c@x-y.example>"):
        assert address.plain_path(text, Limits()) is not None
    assert address.plain_path("<abcdef@abcdefg.h>", _SMALL) is None  # path over 16 octets
    for text in ("<abcdefg@b.c>", "<a@bcdefghijk.c>", "<abcdef@abcdefgh.c.d.e.f>"):
        assert address.plain_path(text, _SMALL) is None
        assert address.parse_path(text, _SMALL, sender=False, utf8=False)[1] is not None


def _first_long_line_at(block: bytes, longest: int, line_start: bool) -> int | None:
    """The rule, line by line: the offset of the first line longer than ``longest`` (its CR
    counted), a leading dot not counted where it begins a line."""
    at = 0
    for i, line in enumerate(block.split(b"\n")):
        stuffed = line.startswith(b".") and (i > 0 or line_start)
        if len(line) - stuffed > longest:
            return at
        at += len(line) + 1
    return None


@settings(max_examples=2000)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"", b".", b".."]), st.integers(0, 40)),
        max_size=12,
    ),
    st.sampled_from([b"\n", b"\r\n"]),
    st.integers(-1, 40),
    st.integers(1, 30),
    st.booleans(),
)
def test_the_long_line_search_finds_the_first_line_the_rule_names(
    lines: list[tuple[bytes, int]], ending: bytes, tail: int, longest: int, line_start: bool
) -> None:
    from spoolsmtp.bsmtp.datascan import _long_line

    block = b"".join(dots + b"a" * n + ending for dots, n in lines)
    block += b"" if tail < 0 else b"." * (tail % 2) + b"b" * tail  # an unfinished last line
    assert _long_line(block, longest, line_start) == _first_long_line_at(block, longest, line_start)
