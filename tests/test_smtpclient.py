"""The SMTP client protocol (``spoolsmtp.smtp.protocol``), pure: bytes in, events out, no socket.

In h11's manner: each test plays the server's bytes into a ``ClientProtocol`` and reads the
events, or tries a command and expects the protocol's verdict.
"""

from __future__ import annotations

import pytest

from spoolsmtp.model.reply import Reply, make
from spoolsmtp.smtp.protocol import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    NEED_DATA,
    ClientProtocol,
    Command,
    Event,
    Extensions,
    LocalProtocolError,
    RemoteProtocolError,
    Verb,
)

EHLO = Command(Verb.EHLO, "EHLO client.test")
MAIL = Command(Verb.MAIL, "MAIL FROM:<a@example.com>")
DATA = Command(Verb.DATA, "DATA")


def events(proto: ClientProtocol, data: bytes = b"") -> list[Event]:
    """Feed ``data``; every event it completes."""
    proto.receive_data(data)
    out = []
    while (event := proto.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def greeted(*, pipelining: bool = False) -> ClientProtocol:
    proto = ClientProtocol()
    assert [e.command.verb for e in events(proto, b"220 mx.test ESMTP\r\n")] == [Verb.GREETING]
    proto.pipelining = pipelining
    return proto


# -- replies ------------------------------------------------------------------------------------


def test_the_first_reply_answers_the_greeting() -> None:
    proto = ClientProtocol()
    assert proto.awaiting is Verb.GREETING
    (event,) = events(proto, b"220 mx.test ESMTP ready\r\n")
    assert event == Event(Command(Verb.GREETING), make(220, None, "mx.test ESMTP ready"))
    assert proto.awaiting is None


def test_a_reply_arriving_one_byte_at_a_time_is_one_event() -> None:
    proto = greeted()
    assert proto.send(MAIL) == b"MAIL FROM:<a@example.com>\r\n"
    wire = b"250-2.1.0 first\r\n250 2.1.0 sender ok\r\n"
    got: list[Event] = []
    for i in range(len(wire)):
        got += events(proto, wire[i : i + 1])
        assert got == [] or i == len(wire) - 1
    assert got == [Event(MAIL, Reply(250, "2.1.0", ("first", "sender ok")))]


def test_multi_line_replies_are_joined_and_bare_lf_is_accepted() -> None:
    proto = ClientProtocol()
    (event,) = events(proto, b"220-mx.test\n220-second\r\n220 third\n")
    assert event.reply.lines == ("mx.test", "second", "third")


def test_a_code_alone_is_a_reply() -> None:
    (event,) = events(ClientProtocol(), b"220\r\n")
    assert (event.reply.code, event.reply.lines) == (220, ("",))


def test_an_enhanced_code_of_another_class_is_text() -> None:
    (event,) = events(ClientProtocol(), b"220 5.0.0 hello\r\n")
    assert (event.reply.enhanced, event.reply.text) == (None, "5.0.0 hello")


def test_control_characters_in_a_reply_are_escaped() -> None:
    (event,) = events(ClientProtocol(), b"220 mx\x1b[2J\x07 ready\r\n")
    assert event.reply.text == "mx\\x1b[2J\\x07 ready"


@pytest.mark.parametrize(
    ("wire", "says"),
    [
        (b"hello there\r\n", "not an SMTP reply line"),
        (b"2200 too many digits\r\n", "not an SMTP reply line"),
        (b"600 no such class\r\n", "not an SMTP reply line"),
        (b"220-one\r\n250 two\r\n", "reply code changed inside a multi-line reply"),
        (b"220 " + b"x" * MAX_REPLY_LINE + b"\r\n", "longer than"),
        (b"220 " + b"x" * MAX_REPLY_LINE, "longer than"),  # no newline yet, already too long
        (b"220-x\r\n" * (MAX_REPLY_LINES + 1), "more than"),
    ],
)
def test_garbage_is_the_servers_fault(wire: bytes, says: str) -> None:
    with pytest.raises(RemoteProtocolError, match=says):
        events(ClientProtocol(), wire)


def test_a_reply_nobody_asked_for_is_the_servers_fault() -> None:
    proto = greeted()
    with pytest.raises(RemoteProtocolError, match="no command was outstanding"):
        events(proto, b"250 surprise\r\n")


def test_a_421_closes_the_connection_whatever_it_answers() -> None:
    proto = greeted()
    proto.send(MAIL)
    (event,) = events(proto, b"421 4.3.2 shutting down\r\n")
    assert event.command == MAIL
    assert proto.closed
    with pytest.raises(LocalProtocolError, match="closed"):
        proto.send(Command(Verb.QUIT, "QUIT"))


def test_quit_closes_the_connection() -> None:
    proto = greeted()
    proto.send(Command(Verb.QUIT, "QUIT"))
    events(proto, b"221 bye\r\n")
    assert proto.closed


# -- EHLO ---------------------------------------------------------------------------------------


def test_ehlo_extensions_are_parsed_from_the_250() -> None:
    proto = greeted()
    proto.send(EHLO)
    events(proto, b"250-mx.test hello\r\n250-pipelining\r\n250-SIZE 1000\r\n250-8BITMIME\r\n")
    assert proto.extensions.names == frozenset()  # not before the last line
    events(proto, b"250-AUTH PLAIN LOGIN\r\n250 DSN\r\n")
    ext = proto.extensions
    assert ext.names == {"PIPELINING", "SIZE", "8BITMIME", "AUTH", "DSN"}
    assert ext.size == 1000
    assert "PIPELINING" in ext and "STARTTLS" not in ext


@pytest.mark.parametrize(
    ("line", "size"),
    [("SIZE", None), ("SIZE 0", None), ("SIZE lots", None), ("SIZE 52428800", 52428800)],
)
def test_size_without_a_usable_limit_means_no_limit(line: str, size: int | None) -> None:
    ext = Extensions.parse(make(250, None, f"mx.test\n{line}"))
    assert "SIZE" in ext
    assert ext.size == size


def test_the_greeting_line_of_ehlo_is_not_an_extension() -> None:
    ext = Extensions.parse(make(250, None, "STARTTLS.example greets you\n\nDSN"))
    assert ext.names == {"DSN"}


def test_a_refused_ehlo_offers_nothing() -> None:
    proto = greeted()
    proto.send(EHLO)
    events(proto, b"502 5.5.1 no EHLO here\r\n")
    assert proto.extensions.names == frozenset()


# -- one command at a time, or pipelined flights -----------------------------------------------


def test_nothing_is_sent_before_the_greeting() -> None:
    proto = ClientProtocol()
    proto.pipelining = True
    with pytest.raises(LocalProtocolError, match="pipelined after GREETING"):
        proto.send(EHLO)


def test_without_pipelining_one_command_is_outstanding() -> None:
    proto = greeted()
    proto.send(MAIL)
    with pytest.raises(LocalProtocolError, match="before the reply to MAIL"):
        proto.send(Command(Verb.RCPT, "RCPT TO:<b@example.org>"))
    events(proto, b"250 ok\r\n")
    proto.send(Command(Verb.RCPT, "RCPT TO:<b@example.org>"))


def test_a_pipelined_flight_pairs_each_reply_with_its_command() -> None:
    proto = greeted(pipelining=True)
    flight = [
        MAIL,
        Command(Verb.RCPT, "RCPT TO:<a@example.org>", 0),
        Command(Verb.RCPT, "RCPT TO:<b@example.org>", 1),
        DATA,
    ]
    wire = b"".join(proto.send(c) for c in flight)
    assert wire == (
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<a@example.org>\r\n"
        b"RCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    assert proto.outstanding == 4
    got = events(proto, b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n")
    assert [(e.command.tag, e.reply.code) for e in got] == [
        (-1, 250),
        (0, 250),
        (1, 550),
        (-1, 354),
    ]
    assert proto.outstanding == 0


@pytest.mark.parametrize(
    "last", [Verb.EHLO, Verb.HELO, Verb.DATA, Verb.STARTTLS, Verb.NOOP, Verb.QUIT]
)
def test_a_command_that_ends_a_flight_is_never_followed_before_its_reply(last: Verb) -> None:
    proto = greeted(pipelining=True)
    proto.send(Command(last, last.name))
    with pytest.raises(LocalProtocolError, match=f"pipelined after {last.name}"):
        proto.send(MAIL)


def test_rset_may_lead_a_flight() -> None:
    proto = greeted(pipelining=True)
    proto.send(Command(Verb.RSET, "RSET"))
    proto.send(MAIL)
    assert proto.outstanding == 2


@pytest.mark.parametrize("verb", [Verb.GREETING, Verb.END_OF_DATA])
def test_what_is_not_a_command_cannot_be_sent(verb: Verb) -> None:
    with pytest.raises(LocalProtocolError, match="is not a command"):
        greeted().send(Command(verb))


# -- the message ------------------------------------------------------------------------------


def test_the_message_goes_only_after_a_354_and_ends_with_the_dot() -> None:
    proto = greeted()
    with pytest.raises(LocalProtocolError, match="without a 354"):
        proto.send_body(b"Subject: x\r\n")
    proto.send(DATA)
    events(proto, b"354 go ahead\r\n")
    assert proto.send_body(b"Subject: x\r\n\r\nhi\r\n") == b"Subject: x\r\n\r\nhi\r\n"
    with pytest.raises(LocalProtocolError, match="while the message body is open"):
        proto.send(Command(Verb.RSET, "RSET"))
    assert proto.send_end_of_data() == b".\r\n"
    assert proto.awaiting is Verb.END_OF_DATA
    (event,) = events(proto, b"250 2.0.0 queued\r\n")
    assert event.command.verb is Verb.END_OF_DATA
    with pytest.raises(LocalProtocolError, match="without a 354"):
        proto.send_end_of_data()


def test_a_refused_data_opens_no_message() -> None:
    proto = greeted()
    proto.send(DATA)
    events(proto, b"554 no valid recipients\r\n")
    with pytest.raises(LocalProtocolError):
        proto.send_body(b"x\r\n")


# -- STARTTLS ---------------------------------------------------------------------------------


def test_bytes_sent_before_tls_are_discarded_and_the_extensions_forgotten() -> None:
    proto = greeted(pipelining=True)
    proto.send(EHLO)
    events(proto, b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    proto.send(Command(Verb.STARTTLS, "STARTTLS"))
    proto.receive_data(b"220 go ahead\r\n250 injected\r\n")
    event = proto.next_event()  # the driver takes the 220 and starts TLS
    assert event is not NEED_DATA and event.reply.code == 220
    assert proto.tls_started() == b"250 injected\r\n"
    assert proto.extensions.names == frozenset()
    assert not proto.pipelining
    proto.send(EHLO)
    (event,) = events(proto, b"250 mx.test\r\n")
    assert event.command == EHLO


def test_tls_cannot_start_with_replies_outstanding() -> None:
    proto = greeted()
    proto.send(Command(Verb.STARTTLS, "STARTTLS"))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        proto.tls_started()


def test_unparsed_bytes_can_be_taken_for_the_trace() -> None:
    proto = greeted()
    proto.receive_data(b"250 half a li")
    assert proto.next_event() is NEED_DATA
    assert proto.discard_unread() == b"250 half a li"
    assert proto.discard_unread() == b""
