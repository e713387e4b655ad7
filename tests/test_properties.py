"""Properties of the reader and writer, over generated transactions and arbitrary bytes."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoolsmtp.bsmtp import writer
from spoolsmtp.bsmtp.reader import Reader
from spoolsmtp.model.config import Limits
from spoolsmtp.model.envelope import Recipient
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.spool import envfile
from tests.helpers import read_in_steps

LIMITS = Limits(max_message_bytes=10**7)
_LOCAL = st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,20}[a-z0-9]", fullmatch=True).filter(
    lambda s: ".." not in s
)
_DOMAIN = st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
_ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN)
# Message lines: any bytes but CR, LF and NUL (what SMTP can carry), leading dots likely.
_LINE = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"", b".", b"..", b". x", b".\xff\xfe", b"From x"]),
).map(lambda b: b.replace(b"\x00", b""))
_MESSAGE = st.lists(_LINE, max_size=30).map(lambda lines: b"".join(x + b"\r\n" for x in lines))
_DRAFT = st.builds(
    lambda sender, rcpts, message: writer.Draft(
        sender, tuple(Recipient(r) for r in dict.fromkeys(rcpts)), message
    ),
    st.one_of(st.just(""), _ADDRESS),
    st.lists(_ADDRESS, min_size=1, max_size=5),
    _MESSAGE,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_DRAFT, min_size=1, max_size=4), st.booleans())
def test_writer_then_reader_is_the_identity(drafts: list[writer.Draft], crlf: bool) -> None:
    data = writer.render(drafts, "batch.example", crlf=crlf)
    env = envfile.read_bytes(data, "p", LIMITS, "mx.test")
    assert env.accepted, env.errors
    assert len(env.transactions) == len(drafts)
    for draft, tx in zip(drafts, env.transactions, strict=True):
        assert tx.mail_from == draft.mail_from
        assert [r.address for r in tx.recipients] == [r.address for r in draft.recipients]
        start, end = tx.message.start, tx.message.end
        raw = data[start:end]
        text = b"".join(envfile.text_chunks(io.BytesIO(data), tx.message, chunk=17))
        assert text == draft.message
        assert tx.message.size == len(draft.message)
        assert len(raw) >= (0 if crlf else len(draft.message) // 2)


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_reader_answers_arbitrary_bytes_with_replies_or_a_fault(data: bytes) -> None:
    reader = Reader("fuzz", LIMITS, "mx.test", max_file_bytes=10**6)
    try:
        reader.feed(data)
        env = reader.finish()
    except EnvelopeFault as exc:
        assert exc.source == "fuzz"
        assert exc.line >= 1
        return
    for entry in env.response:
        assert 200 <= entry.reply.code < 600


_COMMANDY = st.lists(
    st.sampled_from(
        [
            b"HELO h",
            b"EHLO h",
            b"MAIL FROM:<a@b.c>",
            b"MAIL FROM:<>",
            b"RCPT TO:<d@e.f>",
            b"RCPT TO:<bad>",
            b"DATA",
            b".",
            b"..x",
            b"text",
            b"RSET",
            b"QUIT",
            b"NOOP",
            b"VERB ON",
            b"TICK 1",
            b"",
            b"\r",
            b"x\x00",
            b".\r",
        ]
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(_COMMANDY, st.sampled_from([b"\n", b"\r\n"]), st.integers(1, 50))
def test_dialogues_read_the_same_in_any_chunking(lines: list[bytes], nl: bytes, step: int) -> None:
    data = b"".join(line + nl for line in lines)
    whole = read_in_steps(data, max(len(data), 1), LIMITS)
    assert read_in_steps(data, step, LIMITS) == whole


@settings(max_examples=200)
@given(_MESSAGE)
def test_wire_form_has_one_terminator_and_only_crlf(message: bytes) -> None:
    data = writer.render([writer.Draft("a@b.c", (Recipient("d@e.f"),), message)], "h")
    env = envfile.read_bytes(data, "w", LIMITS, "mx.test")
    wire = b"".join(envfile.wire_chunks(io.BytesIO(data), env.transactions[0].message)) + b".\r\n"
    wire = b"\r\n" + wire
    assert wire.count(b"\r\n.\r\n") == 1
    assert wire.endswith(b"\r\n.\r\n")
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")


def _first_long_line(block: bytes, longest: int, line_start: bool) -> int | None:
    """The rule, line by line: a line (its CR counted) longer than ``longest``, a leading
    dot not counted where it begins a line."""
    for i, line in enumerate(block.split(b"\n")):
        stuffed = line.startswith(b".") and (i > 0 or line_start)
        if len(line) - stuffed > longest:
            return i
    return None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(st.tuples(st.sampled_from([b"", b".", b".."]), st.integers(0, 30)), max_size=12),
    ending=st.sampled_from([b"\n", b"\r\n"]),
    tail=st.integers(-1, 30),
    longest=st.integers(1, 24),
    line_start=st.booleans(),
)
def test_the_long_line_check_over_whole_blocks_finds_the_line_the_rule_names(
    lines: list[tuple[bytes, int]], ending: bytes, tail: int, longest: int, line_start: bool
) -> None:
    from spoolsmtp.bsmtp.datascan import block_fault

    block = b"".join(dots + b"a" * n + ending for dots, n in lines)
    block += b"" if tail < 0 else b"b" * tail  # an unfinished last line
    if not block:
        return
    crlf = ending == b"\r\n" and b"\r" not in block.replace(b"\r\n", b"")
    want = _first_long_line(block, longest, line_start)
    if crlf and block.endswith(b"\n"):
        fault = block_fault(block, 1, True, line_start, longest + 1)
        assert (fault is None) == (want is None)
        if fault is not None and want is not None:
            assert f"line {want + 1} longer" in fault.lines[0]


def _scanned_by_the_rule(text: list[bytes]) -> tuple[int, int, bool, bool]:
    """The message rules line by line (SPEC.md "The envelope"), written plainly as the oracle
    of the block scanner, for lines that each end with the file's own line break: the text
    runs to the first line holding only a dot; returns its size (unstuffed, CRLF), its line
    count, whether it ended, and whether a bare CR is in it."""
    size = lines = 0
    bare_cr = False
    for line in text:
        if line == b".":
            return size, lines, True, bare_cr
        lines += 1
        size += len(line) - line.startswith(b".") + 2
        bare_cr = bare_cr or b"\r" in line
    return size, lines, False, bare_cr


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from([b"", b".", b"..", b".x", b"x", b"x\rx", b"x.", b"\xe9"]), max_size=40
    ),
    st.sampled_from([b"\n", b"\r\n"]),
    st.integers(1, 64),
)
def test_message_text_scanned_in_blocks_as_the_line_rule_says(
    text: list[bytes], nl: bytes, step: int
) -> None:
    """Size (dots unstuffed, CRLF counted), lines, the end of data and a bare CR, as the line
    by line rule has them, whether the file comes whole or ``step`` bytes at a time."""
    head = b"".join(x + nl for x in (b"HELO h", b"MAIL FROM:<a@b.c>", b"RCPT TO:<d@e.f>", b"DATA"))
    data = head + b"".join(x + nl for x in text) + b"." + nl + b"QUIT" + nl
    size, lines, ended, bare_cr = _scanned_by_the_rule([*text, b"."])
    assert ended
    for got in (read_in_steps(data, len(data), LIMITS), read_in_steps(data, step, LIMITS)):
        assert not isinstance(got, str), got
        if not bare_cr:
            (tx,) = got.transactions
            assert tx.message is not None
            assert (tx.message.size, tx.message.lines) == (size, lines)
        else:  # refused at its end, the rest of the file read on
            assert got.transactions == ()
            assert any("bare CR" in str(e.reply) for e in got.errors), got.errors
