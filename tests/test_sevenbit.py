"""The 8-bit to 7-bit converter (smtp/sevenbit.py), pure: what it converts, what it refuses,
and (property tests) that what it sends decodes back to the original octets."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoolsmtp.smtp.sevenbit import NotConvertible, eight_bit, to_7bit

HEAD = b"From: a@example.com\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
UTF8 = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def seven_bit_and_short(data: bytes) -> bool:
    return not eight_bit(data) and all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_a_text_part_becomes_quoted_printable_and_decodes_back() -> None:
    body = "Grüße aus Zürich, señor.\r\n.a dot line\r\ntrailing space \r\n".encode()
    msg = (
        HEAD + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    out = to_7bit(msg + body)
    assert seven_bit_and_short(out)
    assert out.startswith(HEAD + b"Content-Type: text/plain; charset=utf-8\r\n")
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in out
    assert b"8bit" not in out
    got = parse(out)
    assert got.get_payload(decode=True) == body
    assert got["Subject"] == "test"


def test_a_missing_transfer_encoding_field_is_added() -> None:
    out = to_7bit(HEAD + b"\r\nna\xc3\xafve\r\n")
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nna=C3=AFve\r\n" in out
    assert parse(out).get_payload(decode=True) == b"na\xc3\xafve\r\n"


def test_multipart_parts_converted_each_by_its_type_and_7bit_parts_untouched() -> None:
    blob = bytes(range(256)) * 3
    msg = (
        HEAD + b'Content-Type: multipart/mixed; boundary="BB"\r\n\r\n'
        b"preamble\r\n--BB\r\nContent-Type: text/plain; charset=latin-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n"
        b"--BB\r\nContent-Type: text/plain\r\n\r\nplain ascii stays\r\n"
        b"--BB\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary"
        b"\r\n\r\n" + blob.replace(b"\r\n", b"") + b"\r\n"
        b"--BB\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9t\xc3\xa9\r\n"
        b"--BB--\r\nepilogue\r\n"
    )
    out = to_7bit(msg)
    assert seven_bit_and_short(out)
    assert b"\r\n--BB\r\nContent-Type: text/plain\r\n\r\nplain ascii stays\r\n--BB\r\n" in out
    parts = list(parse(out).iter_parts())
    assert parts[0].get_payload(decode=True) == b"caf\xe9"
    assert parts[1].get_payload(decode=True) == b"plain ascii stays"
    assert parts[2]["Content-Transfer-Encoding"] == "base64"
    assert parts[2].get_payload(decode=True) == blob.replace(b"\r\n", b"")
    (inner,) = parts[3].iter_parts()
    assert inner["Subject"] == "inner"
    assert inner.get_payload(decode=True) == b"\xc3\xa9t\xc3\xa9"  # the CRLF is the delimiter's
    assert parts[3].get("Content-Transfer-Encoding") is None  # message/rfc822: never encoded


def test_a_message_already_7bit_is_returned_as_is() -> None:
    msg = HEAD + b"Content-Type: text/plain\r\n\r\nhello\r\n"
    assert to_7bit(msg) is msg


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n", "not MIME"),
        (HEAD + b"X-Name: J\xc3\xbcrgen\r\n\r\nbody\r\n", "8-bit octets in the header"),
        (
            HEAD + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
            b"X-Bad: \xe9\r\n\r\nx\r\n--B--\r\n",
            "header of part 1",
        ),
        (
            HEAD + b"Content-Transfer-Encoding: base64\r\n\r\n\xe9\xe9\r\n",
            "8-bit octets in a base64 part",
        ),
        (
            HEAD + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
            b"\xe9\r\n--B\r\n\r\nx\r\n--B--\r\n",
            "preamble or epilogue",
        ),
        (HEAD + b"Content-Type: multipart/mixed\r\n\r\n\xe9\r\n", "without a boundary"),
    ],
)
def test_what_cannot_be_converted_says_why(message: bytes, why: str) -> None:
    with pytest.raises(NotConvertible, match=why):
        to_7bit(message)


# -- properties ------------------------------------------------------------------------------

line = st.binary(max_size=300).map(lambda b: b.replace(b"\r\n", b"\n"))
text = st.lists(line, min_size=1, max_size=20).map(b"\r\n".join)


@settings(max_examples=300, deadline=None)
@given(text)
def test_a_text_body_decodes_back_octet_for_octet(body: bytes) -> None:
    msg = (
        HEAD + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    out = to_7bit(msg + body)
    assert seven_bit_and_short(out)
    assert parse(out).get_payload(decode=True) == body


@settings(max_examples=200, deadline=None)
@given(st.lists(text, min_size=1, max_size=4), st.sampled_from(["text/plain", "image/png"]))
def test_every_part_of_a_multipart_decodes_back(bodies: list[bytes], ctype: str) -> None:
    boundary = b"=_spoolsmtp_test_boundary"
    bodies = [b.replace(b"--" + boundary, b"") for b in bodies]
    msg = HEAD + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
    for b in bodies:
        msg += b"--" + boundary + b"\r\nContent-Type: " + ctype.encode() + b"\r\n\r\n" + b + b"\r\n"
    msg += b"--" + boundary + b"--\r\n"
    out = to_7bit(msg)
    assert seven_bit_and_short(out)
    assert [p.get_payload(decode=True) for p in parse(out).iter_parts()] == bodies
