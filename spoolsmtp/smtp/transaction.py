"""The rules of one SMTP mail transaction, pure: what is sent, which recipient each reply
decides, and what a recipient is owed when the connection dies at each stage.

Shape taken from h11, beside the client protocol (``smtpclient``): no sockets, no clock. The
driver (``session``) builds a ``MailTransaction``, sends its ``commands()`` (pipelined or not),
feeds every reply with the command it answers to ``receive``, calls ``envelope_answered`` once
the replies to MAIL and RCPT are in, ``dot_sent`` when the final dot goes out, ``broken`` when
the connection dies, and then reads ``results()`` and ``again``. The state is ``stage``.

Rules (RFC 5321 sections 3.3, 4.5.3.1.10 and 6.1; RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531
SMTPUTF8, RFC 3461 DSN):

* Decided here, before anything is sent, naming the server: a message over the server's SIZE
  fails ``552 5.3.4``; an 8-bit message to a server without 8BITMIME ``554 5.6.3`` (one that
  ``outgoing`` could convert to 7 bit comes here already converted); a non-ASCII
  address to one without SMTPUTF8 ``554 5.6.7`` (no downgrade). Such results are ``local``.
* MAIL declares SIZE, BODY=8BITMIME and SMTPUTF8 when offered, RET and ENVID when DSN is
  offered; RCPT carries NOTIFY and ORCPT only when DSN is offered.
* A refused MAIL decides every recipient with its reply, and no RCPT is sent after it. A refused
  RCPT decides its own recipient (the tag of the command is the recipient's index). Accepted
  recipients wait: a refused DATA, else the reply to the final dot, decides them all at once.
* When no recipient was accepted, no message is sent; a 354 to a pipelined DATA then leaves the
  server waiting for a message: the connection must be dropped (``drop_connection``).
* The 452 split: recipients refused with 452 (too many recipients) while others were accepted
  are to be sent again in a new transaction (``again``), once the message got its reply.
* The stages are ``Stage``. When the connection breaks (a 421, a loss, a timeout, garbage)
  every recipient not yet decided gets the reason, the stage appended unless it is a 421
  (which says its own). After the final dot is sent the server may have taken the message
  (RFC 5321 section 6.1): those recipients are ``after_dot``, a possible duplicate that must not
  be tried at another host.
* A reused connection that breaks before any reply to this transaction was only stale: the
  transaction starts again on a new connection (``stale``), nobody is decided by it.

Faults split as h11 does: a reply fed out of turn is the driver's fault (``LocalProtocolError``);
whatever a server says is never an exception here, only a recipient's reply.
"""

from __future__ import annotations

from enum import Enum

from spoolsmtp.model.envelope import BodyType, Recipient, Transaction
from spoolsmtp.model.outcome import RecipientResult, decided_here, result
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.smtp.protocol import Command, Event, Extensions, LocalProtocolError, Verb

DATA = Command(Verb.DATA, "DATA")


class Stage(Enum):
    """Where a transaction stands; the value is what a broken connection's reply says."""

    AFTER_MAIL = "after MAIL"  # MAIL and RCPTs (pipelined: and DATA) sent, their replies due
    AFTER_RCPT = "after RCPT"  # every RCPT answered, some accepted: the reply to DATA is due
    DURING_DATA = "during DATA"  # 354 received: the message text is going out
    AFTER_DOT = "after the final dot"  # the dot sent, its reply due: a loss may duplicate
    DONE = "done"  # every recipient decided


class MailTransaction:
    """One transaction for ``recipients`` on one connection to ``host`` [``address``]."""

    def __init__(
        self,
        tx: Transaction,
        recipients: list[Recipient],
        ext: Extensions,
        extra: int,
        host: str | None,
        address: str | None,
        server: str,
        refusal: Reply | None = None,
    ) -> None:
        """``extra`` is the size of what we add to the message (our Received header);
        ``server`` names it in the text of a local refusal; ``refusal``, when given, is one
        decided before (the message cannot be converted for this server)."""
        self.tx = tx
        self.recipients = recipients
        self.ext = ext
        self.extra = extra
        self.host = host
        self.address = address
        self.dsn = "DSN" in ext
        self.stage = Stage.AFTER_MAIL
        self.mail_refused = False
        self.drop_connection = False
        self.dotted = False  # the final dot was (begun to be) written
        self._final: dict[int, RecipientResult] = {}
        self._accepted: list[int] = []
        self._resend: list[int] = []
        self._data: Reply | None = None
        self._answered = False
        self._replies = 0
        refusal = refusal or local_refusal(tx, recipients, ext, extra, server)
        if refusal is not None:
            self._final = {i: decided_here(r, refusal) for i, r in enumerate(recipients)}
            self.stage = Stage.DONE

    def commands(self) -> list[Command]:
        """MAIL and one RCPT per recipient, tagged with its index; DATA is ``DATA``."""
        rcpt = [
            Command(Verb.RCPT, f"RCPT TO:<{r.address}>{rcpt_args(r) if self.dsn else ''}", i)
            for i, r in enumerate(self.recipients)
        ]
        mail = f"MAIL FROM:<{self.tx.mail_from}>{mail_args(self.tx, self.ext, self.extra)}"
        return [Command(Verb.MAIL, mail), *rcpt]

    @property
    def accepted(self) -> list[Recipient]:
        """The recipients whose RCPT was accepted (the message goes to them)."""
        return [self.recipients[i] for i in self._accepted]

    def receive(self, event: Event) -> None:
        """A reply and the command it answers."""
        verb, reply = event.command.verb, event.reply
        if self.stage is Stage.AFTER_MAIL and verb in (Verb.MAIL, Verb.RCPT, Verb.DATA):
            self._replies += 1
            if verb is Verb.MAIL and not reply.ok:
                self.mail_refused = True
                for i, r in enumerate(self.recipients):
                    self._final[i] = self._result(r, reply)
            elif verb is Verb.RCPT and not self.mail_refused:
                if reply.ok:
                    self._accepted.append(event.command.tag)
                else:
                    i = event.command.tag
                    self._final[i] = self._result(self.recipients[i], reply)
            elif verb is Verb.DATA:
                self._data = reply
        elif self.stage is Stage.AFTER_RCPT and verb is Verb.DATA:
            self._on_data(reply)
        elif self.stage is Stage.AFTER_DOT and verb is Verb.END_OF_DATA:
            for i in self._accepted:
                self._final[i] = self._result(self.recipients[i], reply, dsn_relayed=self.dsn)
            self._answered = True
            self.stage = Stage.DONE
        else:
            raise LocalProtocolError(f"a reply to {verb.name} {self.stage.value}")

    def envelope_answered(self) -> Stage:
        """Every reply to MAIL and RCPT is in (and, pipelined, to DATA): the next stage."""
        if self.stage is not Stage.AFTER_MAIL:
            raise LocalProtocolError(f"envelope answered {self.stage.value}")
        self._resend = [i for i in sorted(self._final) if self._final[i].reply.code == 452]
        if len(self._final) == len(self.recipients):
            self.drop_connection = self._data is not None and self._data.code == 354
            self.stage = Stage.DONE
        else:
            self.stage = Stage.AFTER_RCPT
            if self._data is not None:
                self._on_data(self._data)
        return self.stage

    def dot_sent(self) -> None:
        """The final dot is (being) written: from here a loss may leave a duplicate."""
        if self.stage is not Stage.DURING_DATA:
            raise LocalProtocolError(f"final dot {self.stage.value}")
        self.stage = Stage.AFTER_DOT
        self.dotted = True

    def stale(self, *, reused: bool) -> bool:
        """Whether a break now means only that a reused connection had gone stale."""
        return reused and self.stage is Stage.AFTER_MAIL and self._replies == 0

    def broken(self, reason: Reply) -> None:
        """The connection died for ``reason``: every recipient not yet decided is deferred."""
        reply = reason
        if reply.code != 421:
            reply = make(reply.code, reply.enhanced, f"{reply.text} {self.stage.value}".strip())
        after_dot = self.stage is Stage.AFTER_DOT
        for i, r in enumerate(self.recipients):
            if i not in self._final:
                self._final[i] = self._result(r, reply, after_dot=after_dot)
        self.stage = Stage.DONE

    def results(self) -> list[RecipientResult]:
        """A result for each recipient, in order."""
        if self.stage is not Stage.DONE:
            raise LocalProtocolError(f"results asked for {self.stage.value}")
        return [self._final[i] for i in range(len(self.recipients))]

    @property
    def again(self) -> list[Recipient]:
        """The recipients to send again in a new transaction (the 452 split)."""
        return [self.recipients[i] for i in self._resend] if self._answered else []

    def _on_data(self, reply: Reply) -> None:
        if reply.code == 354:
            self.stage = Stage.DURING_DATA
            return
        for i in self._accepted:
            self._final[i] = self._result(self.recipients[i], reply)
        self.stage = Stage.DONE

    def _result(
        self, rcpt: Recipient, reply: Reply, *, after_dot: bool = False, dsn_relayed: bool = False
    ) -> RecipientResult:
        return result(
            rcpt, reply, self.host, self.address, after_dot=after_dot, dsn_relayed=dsn_relayed
        )


def eight_bit(tx: Transaction) -> bool:
    """The message is 8-bit (found so, or declared BODY=8BITMIME)."""
    return tx.message.eight_bit or tx.params.body is BodyType.EIGHT_BIT


def needs_utf8(tx: Transaction, recipients: list[Recipient]) -> bool:
    """SMTPUTF8 was asked for and an address is not ASCII (only then is it required)."""
    return tx.params.smtputf8 and not (
        tx.mail_from.isascii() and all(r.address.isascii() for r in recipients)
    )


def local_refusal(
    tx: Transaction, recipients: list[Recipient], ext: Extensions, extra: int, server: str
) -> Reply | None:
    """A reason to fail the transaction on this server without sending it (decided here: the
    text names the server whose limit or lack it was)."""
    size = tx.message.size + extra
    if ext.size is not None and size > ext.size:
        return make(
            552, "5.3.4", f"message of {size} octets exceeds the limit {ext.size} of {server}"
        )
    if eight_bit(tx) and "8BITMIME" not in ext:
        return make(554, "5.6.3", f"8-bit message but {server} does not offer 8BITMIME")
    if needs_utf8(tx, recipients) and "SMTPUTF8" not in ext:
        return make(554, "5.6.7", f"non-ASCII address but {server} does not offer SMTPUTF8")
    return None


def mail_args(tx: Transaction, ext: Extensions, extra: int) -> str:
    """The parameters of MAIL FROM this server is given, each after a space."""
    args: list[str] = []
    if "SIZE" in ext:
        args.append(f"SIZE={tx.message.size + extra}")
    if eight_bit(tx) and "8BITMIME" in ext:
        args.append("BODY=8BITMIME")
    if tx.params.smtputf8 and "SMTPUTF8" in ext:
        args.append("SMTPUTF8")
    if "DSN" in ext:
        if tx.params.ret is not None:
            args.append(f"RET={tx.params.ret.value}")
        if tx.params.envid is not None:
            args.append(f"ENVID={tx.params.envid}")
    return "".join(" " + a for a in args)


def rcpt_args(rcpt: Recipient) -> str:
    """The DSN parameters of RCPT TO (NOTIFY, ORCPT), each after a space."""
    rendered = rcpt.render()
    return rendered[len(f"<{rcpt.address}>") :]
