"""Writes the envelope corpus: one ``NAME.bsmtp`` per case (run from anywhere; idempotent).

The cases live here as Python so that CR, LF and NUL bytes stay visible in review. Each case's
expected ``spoolsmtp check`` output is kept beside it as ``NAME.expected``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
HELO = "HELO batch01.example.com"
MAIL = "MAIL FROM:<oper@example.com>"
RCPT = "RCPT TO:<alice@example.org>"


def crlf(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def lf(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def tx(*body: str, mail: str = MAIL, rcpts: tuple[str, ...] = (RCPT,)) -> tuple[str, ...]:
    return (mail, *rcpts, "DATA", *body, ".")


SMUGGLING = {
    "lf_dot_lf": b"\n.\n",
    "lf_dot_cr": b"\n.\r",
    "cr_dot_lf": b"\r.\n",
    "cr_dot_cr": b"\r.\r",
    "lf_dot_crlf": b"\n.\r\n",
    "cr_dot_crlf": b"\r.\r\n",
    "crlf_dot_crcrlf": b"\r\n.\r\r\n",
    "crcrlf_dot_crcrlf": b"\r\r\n.\r\r\n",
    "crlf_nul_dot_crlf": b"\r\n\x00.\r\n",
}

CASES: dict[str, bytes] = {
    "spec_example": lf(
        HELO,
        "VERB ON",
        "TICK 0042",
        MAIL,
        RCPT,
        "RCPT TO:<bob@example.net>",
        "DATA",
        "Subject: nightly report",
        "",
        "..a line that began with a dot",
        ".",
        "QUIT",
    ),
    "basic_crlf": crlf(HELO, *tx("Subject: hi", "", "hello"), "QUIT"),
    "three_transactions": crlf(
        HELO,
        *tx("Subject: one", "", "1"),
        *tx("Subject: two", "", "2", rcpts=("RCPT TO:<b@example.net>", "RCPT TO:<c@example.net>")),
        *tx("Subject: three", "", "3", mail="MAIL FROM:<>"),
        "QUIT",
    ),
    "verb_off": crlf(HELO, "VERB ON", "VERB OFF", *tx("x"), "QUIT"),
    "verb_bad": crlf(HELO, "VERB LOUD", *tx("x"), "QUIT"),
    "tick_missing_id": crlf(HELO, "TICK", *tx("x"), "QUIT"),
    "rset_discards_silently": crlf(HELO, MAIL, RCPT, "RSET", *tx("after reset"), "QUIT"),
    "noop_help": crlf(HELO, "NOOP", "HELP", *tx("x"), "QUIT"),
    "quit_implied": crlf(HELO, *tx("no quit")),
    "lowercase_verbs": crlf(
        "helo batch01",
        "mail from:<oper@example.com>",
        "rcpt to:<alice@example.org>",
        "data",
        "x",
        ".",
        "quit",
    ),
    "ehlo_extensions": crlf("EHLO batch01.example.com", *tx("x"), "QUIT"),
    "mail_before_helo": crlf(MAIL, RCPT, "QUIT"),
    "rcpt_before_mail": crlf(HELO, RCPT, *tx("x"), "QUIT"),
    "data_without_recipients": crlf(
        HELO,
        MAIL,
        "RCPT TO:<not an address>",
        "DATA",
        "MAIL FROM:<skipped@example.com>",
        ".",
        *tx("next one ok"),
        "QUIT",
    ),
    "data_before_mail": crlf(HELO, "DATA", "body line", ".", "QUIT"),
    "nested_mail": crlf(HELO, MAIL, MAIL, RCPT, "DATA", "x", ".", "QUIT"),
    "unknown_command": crlf(HELO, "FROB the widget", *tx("x"), "QUIT"),
    "not_in_batch": crlf(HELO, "STARTTLS", "VRFY alice", "AUTH PLAIN AAAA", *tx("x"), "QUIT"),
    "bad_sender_syntax": crlf(HELO, "MAIL FROM:<oper@@example.com>", RCPT, "QUIT"),
    "sender_without_brackets": crlf(HELO, "MAIL FROM:oper@example.com", "QUIT"),
    "mail_syntax": crlf(HELO, "MAIL <oper@example.com>", "QUIT"),
    "bad_recipient_syntax": crlf(
        HELO,
        MAIL,
        "RCPT TO:<alice@exa mple.org>",
        "RCPT TO:<alice.@example.org>",
        "RCPT TO:<@example.org>",
        "RCPT TO:<alice@-bad-.org>",
        RCPT,
        "DATA",
        "x",
        ".",
        "QUIT",
    ),
    "partial_recipients": crlf(
        HELO,
        MAIL,
        RCPT,
        "RCPT TO:<bob@@example.net>",
        "RCPT TO:<carol@example.net>",
        "DATA",
        "x",
        ".",
        "QUIT",
    ),
    "local_part_too_long": crlf(HELO, MAIL, "RCPT TO:<" + "l" * 65 + "@example.org>", "QUIT"),
    "domain_too_long": crlf(HELO, MAIL, "RCPT TO:<a@" + ".".join(["d" * 60] * 2) + ".org>", "QUIT"),
    "path_too_long": crlf(
        HELO, MAIL, "RCPT TO:<" + "l" * 60 + "@" + ".".join(["d" * 60] * 4) + ">", "QUIT"
    ),
    "command_line_too_long": crlf(HELO, "NOOP " + "x" * 600, *tx("x"), "QUIT"),
    "text_line_too_long": crlf(HELO, *tx("short", "y" * 1001, "short"), "QUIT"),
    "too_many_recipients": crlf(
        HELO, MAIL, *[f"RCPT TO:<r{i}@example.org>" for i in range(7)], "DATA", "x", ".", "QUIT"
    ),
    "size_param_too_big": crlf(HELO, "MAIL FROM:<oper@example.com> SIZE=999999999", "QUIT"),
    "size_param_bad": crlf(HELO, "MAIL FROM:<oper@example.com> SIZE=ten", "QUIT"),
    "message_too_big": crlf(HELO, *tx(*["z" * 900] * 6), "QUIT"),
    "unknown_mail_param": crlf(HELO, "MAIL FROM:<oper@example.com> AUTH=<>", "QUIT"),
    "unknown_rcpt_param": crlf(HELO, MAIL, "RCPT TO:<alice@example.org> FOO=BAR", "QUIT"),
    "duplicate_param": crlf(HELO, "MAIL FROM:<oper@example.com> RET=FULL RET=HDRS", "QUIT"),
    "notify_values": crlf(
        HELO,
        MAIL,
        "RCPT TO:<a@example.org> NOTIFY=NEVER",
        "RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE,DELAY",
        "RCPT TO:<c@example.org> NOTIFY=NEVER,SUCCESS",
        "RCPT TO:<d@example.org> NOTIFY=SOMETIMES",
        "DATA",
        "x",
        ".",
        "QUIT",
    ),
    "orcpt": crlf(
        HELO,
        MAIL,
        "RCPT TO:<a@example.org> ORCPT=rfc822;a+2Bx@example.org",
        "RCPT TO:<b@example.org> ORCPT=nonsense",
        "DATA",
        "x",
        ".",
        "QUIT",
    ),
    "envid_ret": crlf(
        HELO, *tx("x", mail="MAIL FROM:<oper@example.com> RET=HDRS ENVID=job42+2Brun7"), "QUIT"
    ),
    "body_types": crlf(
        HELO,
        *tx("caf\u00e9", mail="MAIL FROM:<oper@example.com> BODY=8BITMIME"),
        "MAIL FROM:<oper@example.com> BODY=BINARYMIME",
        "MAIL FROM:<oper@example.com> BODY=9BIT",
        "QUIT",
    ),
    "utf8_without_smtputf8": crlf(HELO, MAIL, "RCPT TO:<j\u00f6rg@b\u00fccher.example>", "QUIT"),
    "utf8_with_smtputf8": crlf(
        HELO,
        *tx(
            "x",
            mail="MAIL FROM:<oper@example.com> SMTPUTF8",
            rcpts=("RCPT TO:<j\u00f6rg@b\u00fccher.example>",),
        ),
        "QUIT",
    ),
    "invalid_utf8_command": crlf(HELO, "NOOP batch01").replace(b"batch01\r", b"batch\xff01\r")
    + crlf("QUIT"),
    "latin1_first_line": "HELO b\u00e4tch01\r\nQUIT\r\n".encode("latin-1"),
    "crlf_terminator_in_lf_file": lf(HELO, MAIL, RCPT, "DATA", "text")
    + b"more\r\n.\r\n"
    + lf("still message", ".", "QUIT"),
    "abandoned_at_quit": crlf(HELO, MAIL, RCPT, "QUIT"),
    "abandoned_at_eof": crlf(HELO, *tx("x"), MAIL, RCPT),
    "command_after_quit": crlf(HELO, *tx("x"), "QUIT", MAIL),
    "concatenated_sessions": crlf(HELO, *tx("one"), "QUIT", HELO, *tx("two"), "QUIT"),
    "helo_mid_transaction": crlf(
        HELO, MAIL, RCPT, "HELO other.example.com", "DATA", "x", ".", "QUIT"
    ),
    "dot_stuffing": crlf(HELO, *tx("..", "...", "..x", ".y", "z."), "QUIT"),
    "empty_message": crlf(HELO, *tx(), "QUIT"),
    "lf_line_in_crlf_commands": crlf(HELO) + b"NOOP\n" + crlf(*tx("x"), "QUIT"),
    "bare_cr_in_command": crlf(HELO) + b"NOOP\rNOOP\r\n" + crlf(*tx("x"), "QUIT"),
    "source_route": crlf(
        HELO, *tx("x", rcpts=("RCPT TO:<@relay.example,@hop.example:alice@example.org>",)), "QUIT"
    ),
    "quoted_local_part": crlf(
        HELO,
        *tx("x", rcpts=('RCPT TO:<"john smith"@example.org>', 'RCPT TO:<"a>b"@example.org>')),
        "QUIT",
    ),
    "address_literal": crlf(
        HELO,
        MAIL,
        "RCPT TO:<a@[127.0.0.1]>",
        "RCPT TO:<b@[IPv6:::1]>",
        "RCPT TO:<c@[999.1.1.1]>",
        "DATA",
        "x",
        ".",
        "QUIT",
    ),
    "duplicate_recipient": crlf(
        HELO, *tx("x", rcpts=(RCPT, "RCPT TO:<Alice@Example.org>")), "QUIT"
    ),
    "no_final_newline": crlf(HELO, *tx("x")) + b"QUIT",
    "blank_lines_skipped": crlf("", HELO, "", *tx("x"), "", "QUIT", "", ""),
    "received_headers": crlf(
        HELO,
        *tx(
            "Received: from a by b",
            "received : from c by d",
            "Subject: s",
            "",
            "Received: in the body does not count",
        ),
        "QUIT",
    ),
    # Structural faults: the whole file is rejected.
    "empty_file": b"",
    "only_blank_lines": b"\r\n\r\n  \r\n",
    "binary_png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
    "unterminated_data": crlf(HELO, MAIL, RCPT, "DATA", "the end never comes"),
    "nul_in_command": crlf(HELO) + b"MAIL FROM:<a\x00@example.com>\r\n" + crlf("QUIT"),
    "file_too_large": crlf(HELO, *tx(*["w" * 70] * 300), "QUIT"),
}

for _name, _seq in SMUGGLING.items():
    # The sequence sits inside a message and is followed by what would be a second transaction
    # if it were taken for the end of data; the whole message must be refused instead.
    CASES[f"smuggle_{_name}"] = (
        crlf(HELO, MAIL, RCPT, "DATA", "Subject: smuggling test", "", "before")
        + b"before"
        + _seq
        + crlf("MAIL FROM:<evil@example.com>", "RCPT TO:<victim@example.net>", "DATA", "spoof")
        + crlf(".", "QUIT")
    )


def main() -> None:
    for name, data in CASES.items():
        (HERE / f"{name}.bsmtp").write_bytes(data)


if __name__ == "__main__":
    main()
