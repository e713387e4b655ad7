"""The SMTP transaction rules (``spoolsmtp.smtp.transaction``), pure: no socket, no sleep.

Every test feeds replies as a server would send them and reads what each recipient is owed.
"""

from __future__ import annotations

import pytest

from spoolsmtp.model.envelope import (
    BodyType,
    MailParams,
    Message,
    Notify,
    Recipient,
    Ret,
    Transaction,
)
from spoolsmtp.model.outcome import Status
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.smtp.protocol import (
    NEED_DATA,
    ClientProtocol,
    Command,
    Event,
    Extensions,
    LocalProtocolError,
    Verb,
)
from spoolsmtp.smtp.transaction import DATA, MailTransaction, Stage

EXTRA = 40  # the size of our Received header
OK = make(250, "2.1.5", "ok")
QUEUED = make(250, "2.0.0", "queued as 1")
GO_AHEAD = make(354, None, "go ahead")


def transaction(
    *addresses: str,
    size: int = 100,
    eight_bit: bool = False,
    params: MailParams | None = None,
    sender: str = "from@example.com",
) -> Transaction:
    recipients = tuple(Recipient(a) for a in addresses or ("to@example.org",))
    message = Message(0, size, True, 3, size, eight_bit, 0)
    return Transaction(1, 1, "client.test", sender, params or MailParams(), recipients, message)


def ext(*names: str, size: int | None = None) -> Extensions:
    return Extensions(frozenset(names), size)


def begin(
    tx: Transaction, extensions: Extensions | None = None, recipients: list[Recipient] | None = None
) -> MailTransaction:
    rcpts = list(tx.recipients) if recipients is None else recipients
    return MailTransaction(
        tx, rcpts, extensions or ext(), EXTRA, "mx.example.org", "192.0.2.1", "mx[192.0.2.1]:25"
    )


def answer(mt: MailTransaction, mail: Reply, *rcpt: Reply, data: Reply | None = None) -> Stage:
    """Feed the replies to MAIL, each RCPT (and a pipelined DATA); the envelope is answered."""
    commands = mt.commands()
    mt.receive(Event(commands[0], mail))
    for command, reply in zip(commands[1:], rcpt, strict=True):
        mt.receive(Event(command, reply))
    if data is not None:
        mt.receive(Event(DATA, data))
    return mt.envelope_answered()


def finish(mt: MailTransaction, end: Reply) -> None:
    """DATA accepted (unless already), the message sent, ``end`` the reply to the dot."""
    if mt.stage is Stage.AFTER_RCPT:
        mt.receive(Event(DATA, GO_AHEAD))
    mt.dot_sent()
    mt.receive(Event(Command(Verb.END_OF_DATA), end))


def replies(mt: MailTransaction) -> list[tuple[str, int, Status]]:
    return [(r.recipient.address, r.reply.code, r.status) for r in mt.results()]


# -- stages ------------------------------------------------------------------------------------


def test_the_stages_are_named_as_a_broken_connection_reports_them() -> None:
    assert [s.value for s in Stage] == [
        "after MAIL",
        "after RCPT",
        "during DATA",
        "after the final dot",
        "done",
    ]


def test_a_transaction_walks_the_stages_in_order() -> None:
    mt = begin(transaction("a@example.org"))
    seen = [mt.stage]
    seen.append(answer(mt, OK, OK))
    mt.receive(Event(DATA, GO_AHEAD))
    seen.append(mt.stage)
    mt.dot_sent()
    seen.append(mt.stage)
    mt.receive(Event(Command(Verb.END_OF_DATA), QUEUED))
    seen.append(mt.stage)
    assert seen == list(Stage)
    assert replies(mt) == [("a@example.org", 250, Status.DELIVERED)]
    assert mt.results()[0].host == "mx.example.org"
    assert mt.results()[0].address == "192.0.2.1"


def test_a_pipelined_data_reply_moves_straight_to_the_message() -> None:
    mt = begin(transaction("a@example.org"))
    assert answer(mt, OK, OK, data=GO_AHEAD) is Stage.DURING_DATA


# -- what is sent --------------------------------------------------------------------------------


def test_mail_declares_only_what_the_server_offers() -> None:
    params = MailParams(body=BodyType.EIGHT_BIT, smtputf8=True, ret=Ret.HDRS, envid="E1")
    tx = transaction("a@example.org", size=1000, params=params)
    bare = begin(tx, ext("8BITMIME")).commands()[0]
    assert bare.text == "MAIL FROM:<from@example.com> BODY=8BITMIME"
    full = begin(tx, ext("SIZE", "8BITMIME", "SMTPUTF8", "DSN")).commands()[0]
    assert full == Command(
        Verb.MAIL, "MAIL FROM:<from@example.com> SIZE=1040 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=E1"
    )


def test_rcpt_carries_dsn_parameters_only_to_a_server_offering_dsn() -> None:
    rcpt = Recipient("a@example.org", frozenset({Notify.FAILURE}), "rfc822;a@example.org")
    tx = transaction()
    plain = begin(tx, ext(), [rcpt]).commands()[1]
    dsn = begin(tx, ext("DSN"), [rcpt]).commands()[1]
    assert plain == Command(Verb.RCPT, "RCPT TO:<a@example.org>", 0)
    assert dsn.text == "RCPT TO:<a@example.org> NOTIFY=FAILURE ORCPT=rfc822;a@example.org"


def test_each_rcpt_is_tagged_with_its_recipients_index() -> None:
    mt = begin(transaction("a@example.org", "b@example.org", "c@example.org"))
    assert [(c.verb, c.tag) for c in mt.commands()] == [
        (Verb.MAIL, -1),
        (Verb.RCPT, 0),
        (Verb.RCPT, 1),
        (Verb.RCPT, 2),
    ]


# -- replies matched to recipients -----------------------------------------------------------


def test_each_rcpt_reply_decides_its_own_recipient_and_the_dot_the_accepted() -> None:
    mt = begin(transaction("a@example.org", "b@example.org", "c@example.org", "d@example.org"))
    answer(mt, OK, OK, make(550, "5.1.1", "no such user"), OK, make(450, "4.2.0", "greylisted"))
    assert mt.accepted == [Recipient("a@example.org"), Recipient("c@example.org")]
    finish(mt, QUEUED)
    assert replies(mt) == [
        ("a@example.org", 250, Status.DELIVERED),
        ("b@example.org", 550, Status.FAILED),
        ("c@example.org", 250, Status.DELIVERED),
        ("d@example.org", 450, Status.DEFERRED),
    ]


def test_pipelined_replies_parsed_from_pieces_reach_the_right_recipient() -> None:
    """The two pure layers together: the protocol pairs replies with commands, the transaction
    gives each to its recipient, whatever the pieces the bytes arrive in."""
    mt = begin(transaction("a@example.org", "b@example.org", "c@example.org"))
    proto = ClientProtocol()
    proto.receive_data(b"220 mx ready\r\n")
    assert proto.next_event() is not NEED_DATA
    proto.pipelining = True
    wire = b"".join(proto.send(c) for c in [*mt.commands(), DATA])
    assert wire.count(b"\r\n") == 5
    server = b"250 ok\r\n250 ok a\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n250 ok c\r\n354 go\r\n"
    for i in range(0, len(server), 7):
        proto.receive_data(server[i : i + 7])
        while (event := proto.next_event()) is not NEED_DATA:
            mt.receive(event)
    assert mt.envelope_answered() is Stage.DURING_DATA
    finish(mt, QUEUED)
    by_address = {r.recipient.address: r.reply for r in mt.results()}
    assert by_address["a@example.org"] == QUEUED
    assert by_address["b@example.org"] == Reply(550, "5.1.1", ("no", "such user"))
    assert by_address["c@example.org"] == QUEUED


def test_a_refused_mail_decides_everyone_and_ends_the_envelope() -> None:
    mt = begin(transaction("a@example.org", "b@example.org"))
    refused = make(553, "5.7.1", "sender refused")
    mt.receive(Event(mt.commands()[0], refused))
    assert mt.mail_refused
    # pipelined RCPT replies after a refused MAIL say nothing about the recipients
    mt.receive(Event(mt.commands()[1], OK))
    assert mt.envelope_answered() is Stage.DONE
    assert [r.reply for r in mt.results()] == [refused, refused]
    assert not mt.drop_connection


def test_a_refused_data_decides_every_accepted_recipient() -> None:
    mt = begin(transaction("a@example.org", "b@example.org"))
    answer(mt, OK, OK, make(550, None, "no"))
    assert mt.stage is Stage.AFTER_RCPT
    mt.receive(Event(DATA, make(554, "5.5.1", "no valid recipients")))
    assert replies(mt) == [
        ("a@example.org", 554, Status.FAILED),
        ("b@example.org", 550, Status.FAILED),
    ]


@pytest.mark.parametrize(("data", "drop"), [(GO_AHEAD, True), (make(554, None, "no"), False)])
def test_no_message_goes_to_nobody_and_a_waiting_server_is_dropped(data: Reply, drop: bool) -> None:
    mt = begin(transaction("a@example.org"))
    assert answer(mt, OK, make(550, None, "no"), data=data) is Stage.DONE
    assert mt.drop_connection is drop
    assert replies(mt) == [("a@example.org", 550, Status.FAILED)]


def test_the_server_that_relays_with_dsn_reports_from_there_on() -> None:
    mt = begin(transaction("a@example.org", "b@example.org"), ext("DSN"))
    answer(mt, OK, OK, make(550, None, "no"))
    finish(mt, QUEUED)
    assert [r.dsn_relayed for r in mt.results()] == [True, False]


# -- the 452 split -------------------------------------------------------------------------------


def test_452_recipients_are_sent_again_once_the_message_got_its_reply() -> None:
    mt = begin(transaction("a@example.org", "b@example.org", "c@example.org"))
    too_many = make(452, "4.5.3", "too many recipients")
    answer(mt, OK, OK, too_many, too_many)
    assert mt.again == []
    finish(mt, QUEUED)
    assert mt.again == [Recipient("b@example.org"), Recipient("c@example.org")]
    assert replies(mt)[1:] == [
        ("b@example.org", 452, Status.DEFERRED),
        ("c@example.org", 452, Status.DEFERRED),
    ]


def test_a_452_to_the_dot_is_not_a_resend() -> None:
    mt = begin(transaction("a@example.org", "b@example.org"))
    answer(mt, OK, OK, OK)
    finish(mt, make(452, "4.3.1", "insufficient storage"))
    assert mt.again == []
    assert replies(mt) == [
        ("a@example.org", 452, Status.DEFERRED),
        ("b@example.org", 452, Status.DEFERRED),
    ]


@pytest.mark.parametrize("how", ["all refused", "data refused", "broken"])
def test_no_resend_unless_the_message_was_sent(how: str) -> None:
    mt = begin(transaction("a@example.org", "b@example.org"))
    too_many = make(452, "4.5.3", "too many recipients")
    if how == "all refused":
        answer(mt, OK, too_many, too_many)
    elif how == "data refused":
        answer(mt, OK, OK, too_many, data=make(451, None, "try later"))
    else:
        answer(mt, OK, OK, too_many, data=GO_AHEAD)
        mt.broken(make(451, "4.4.2", "connection lost"))
    assert mt.stage is Stage.DONE
    assert mt.again == []


# -- a broken connection, per stage ------------------------------------------------------------


LOST = make(451, "4.4.2", "connection lost")


def broken_at(stage: Stage, reason: Reply = LOST) -> MailTransaction:
    """Two recipients, the second refused; the connection breaks at ``stage``."""
    mt = begin(transaction("a@example.org", "b@example.org"))
    refused = make(550, "5.1.1", "no such user")
    if stage is Stage.AFTER_MAIL:
        mt.receive(Event(mt.commands()[0], OK))
    else:
        answer(mt, OK, OK, refused)
        if stage is not Stage.AFTER_RCPT:
            mt.receive(Event(DATA, GO_AHEAD))
        if stage is Stage.AFTER_DOT:
            mt.dot_sent()
    assert mt.stage is stage
    mt.broken(reason)
    return mt


@pytest.mark.parametrize(
    "stage", [Stage.AFTER_MAIL, Stage.AFTER_RCPT, Stage.DURING_DATA, Stage.AFTER_DOT]
)
def test_a_loss_defers_the_undecided_saying_the_stage(stage: Stage) -> None:
    first, second = broken_at(stage).results()
    assert first.status is Status.DEFERRED
    assert first.reply == make(451, "4.4.2", f"connection lost {stage.value}")
    assert first.after_dot is (stage is Stage.AFTER_DOT)
    if stage is Stage.AFTER_MAIL:
        assert second.reply == first.reply  # its RCPT was never answered
    else:
        assert (second.reply.code, second.after_dot) == (550, False)  # decided before the loss


def test_only_a_loss_after_the_dot_is_a_possible_duplicate() -> None:
    duplicates = {
        stage: [r.after_dot for r in broken_at(stage).results()]
        for stage in (Stage.AFTER_MAIL, Stage.AFTER_RCPT, Stage.DURING_DATA, Stage.AFTER_DOT)
    }
    assert duplicates == {
        Stage.AFTER_MAIL: [False, False],
        Stage.AFTER_RCPT: [False, False],
        Stage.DURING_DATA: [False, False],
        Stage.AFTER_DOT: [True, False],
    }


def test_a_421_says_its_own_reason() -> None:
    closing = make(421, "4.3.2", "shutting down")
    (first, _) = broken_at(Stage.AFTER_RCPT, closing).results()
    assert first.reply == closing


def test_a_reused_connection_that_breaks_before_any_reply_was_stale() -> None:
    mt = begin(transaction())
    assert mt.stale(reused=True)
    assert not mt.stale(reused=False)
    mt.receive(Event(mt.commands()[0], OK))
    assert not mt.stale(reused=True)


# -- decided here, before sending ------------------------------------------------------------


@pytest.mark.parametrize(
    ("tx", "extensions", "code", "enhanced"),
    [
        (transaction(size=961), ext("SIZE", size=1000), 552, "5.3.4"),
        (transaction(eight_bit=True), ext(), 554, "5.6.3"),
        (transaction(params=MailParams(body=BodyType.EIGHT_BIT)), ext(), 554, "5.6.3"),
        (transaction("jörg@example.org", params=MailParams(smtputf8=True)), ext(), 554, "5.6.7"),
        (
            transaction(params=MailParams(smtputf8=True), sender="ü@example.com"),
            ext(),
            554,
            "5.6.7",
        ),
    ],
)
def test_a_server_that_cannot_take_it_is_refused_here(
    tx: Transaction, extensions: Extensions, code: int, enhanced: str
) -> None:
    mt = begin(tx, extensions)
    assert mt.stage is Stage.DONE
    (res,) = mt.results()
    assert (res.reply.code, res.reply.enhanced, res.local, res.host) == (code, enhanced, True, None)
    assert "mx[192.0.2.1]:25" in res.reply.text


@pytest.mark.parametrize(
    ("tx", "extensions"),
    [
        (transaction(size=960), ext("SIZE", size=1000)),
        (transaction(size=10**9), ext()),  # no SIZE offered: no limit known
        (transaction(eight_bit=True), ext("8BITMIME")),
        (transaction(params=MailParams(smtputf8=True)), ext()),  # asked for, not needed
    ],
)
def test_what_the_server_can_take_is_sent(tx: Transaction, extensions: Extensions) -> None:
    assert begin(tx, extensions).stage is Stage.AFTER_MAIL


# -- the driver's faults ---------------------------------------------------------------------


def test_replies_out_of_turn_are_the_drivers_fault() -> None:
    mt = begin(transaction())
    with pytest.raises(LocalProtocolError):
        mt.receive(Event(Command(Verb.END_OF_DATA), QUEUED))
    with pytest.raises(LocalProtocolError):
        mt.dot_sent()
    with pytest.raises(LocalProtocolError):
        mt.results()
    answer(mt, OK, OK)
    with pytest.raises(LocalProtocolError):
        mt.envelope_answered()
    with pytest.raises(LocalProtocolError):
        mt.receive(Event(Command(Verb.RSET, "RSET"), OK))
