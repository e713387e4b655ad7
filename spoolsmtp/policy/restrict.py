"""Who may send what, pure: the owner of an envelope file against ``submit.allowed_users`` and
``allowed_groups``, senders and recipients against the ``restrict`` list, and MAIL FROM against
the addresses the owner may use (``sender_policy: owner`` with ``senders``).

The VM service machine's RESTRICT statement and secure gateway, Postfix's
``authorized_submit_users`` and sender login maps. A whole file is refused (``may_submit`` says
why); inside an allowed file a refused sender refuses its transaction and a refused recipient
that recipient (``screen``): they become refused commands of the envelope, as a reader's
refusals are, and are reported the same way. Nothing refused is left in the transactions, so
nothing refused reaches the wire. Addresses are compared without regard to case (a refusal of
``boss@`` must not be got round with ``Boss@``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from spoolsmtp.model.config import SenderPolicy, SubmitConfig
from spoolsmtp.model.envelope import Entry, Envelope, Transaction
from spoolsmtp.model.reply import make

NULL_SENDER = "<>"


@dataclass(frozen=True)
class Submitter:
    """The owner of an envelope file: uid and gid (of the file), the user's name if it has one,
    the groups it is in (the file's, the user's primary and supplementary: numbers and names),
    and whether it is the worker itself (its reports are never refused for who wrote them)."""

    uid: int
    gid: int
    user: str | None = None
    groups: frozenset[str] = frozenset()
    worker: bool = False

    @property
    def shown(self) -> str:
        return f"uid {self.uid} ({self.user})" if self.user else f"uid {self.uid}"

    def names(self) -> set[str]:
        return {str(self.uid)} | ({self.user} if self.user else set())


def may_submit(who: Submitter, cfg: SubmitConfig) -> str | None:
    """Why ``who`` may not submit at all, or None."""
    if who.worker or not (cfg.allowed_users or cfg.allowed_groups):
        return None
    if who.names() & set(cfg.allowed_users):
        return None
    if (who.groups | {str(who.gid)}) & set(cfg.allowed_groups):
        return None
    return (
        f"the file's owner {who.shown} may not submit mail"
        " (not in submit.allowed_users or submit.allowed_groups)"
    )


def matches(address: str, pattern: str) -> bool:
    """``pattern``: an exact address, ``@domain`` (that domain) or ``*.domain`` (any of its
    subdomains), compared without regard to case."""
    address, pattern = address.lower(), pattern.lower().strip()
    domain = address.rpartition("@")[2]
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    if pattern.startswith("@"):
        return domain == pattern[1:]
    if pattern == NULL_SENDER:
        return address == ""
    return address == pattern


def restricted(address: str, patterns: tuple[str, ...]) -> str | None:
    """The ``restrict`` entry that refuses ``address``, or None. The null sender is never
    restricted (reports must be able to go out)."""
    if not address:
        return None
    return next((p for p in patterns if matches(address, p)), None)


def sender_fault(who: Submitter, sender: str, cfg: SubmitConfig) -> str | None:
    """Why ``who`` may not use ``sender`` as MAIL FROM, or None."""
    hit = restricted(sender, cfg.restrict)
    if hit is not None:
        return f"sender <{sender}> is restricted (submit.restrict: {hit})"
    if cfg.sender_policy is SenderPolicy.ANY or who.worker:
        return None
    allowed = [a for name in sorted(who.names()) for a in cfg.senders.get(name, ())]
    if any(matches(sender, a) for a in allowed):
        return None
    return f"{who.shown} may not send as <{sender}> (submit.sender_policy: owner; submit.senders)"


def screen(env: Envelope, who: Submitter, cfg: SubmitConfig, owner_mailbox: str) -> Envelope:
    """The envelope without what ``who`` may not send, each refusal a refused command.

    A transaction whose sender is refused is reported to ``owner_mailbox`` (the sender may not
    be who wrote the file); a refused recipient to the transaction's sender."""
    if not cfg.restrict and (cfg.sender_policy is SenderPolicy.ANY or who.worker):
        return env
    kept: list[Transaction] = []
    refused: list[Entry] = []
    for tx in env.transactions:
        fault = sender_fault(who, tx.mail_from, cfg)
        if fault is not None:
            reply = make(550, "5.7.1", f"{fault}; message not sent")
            refused.append(Entry(tx.line, f"MAIL FROM:<{tx.mail_from}>", reply, owner_mailbox))
            continue
        recipients = []
        for r in tx.recipients:
            hit = restricted(r.address, cfg.restrict)
            if hit is None:
                recipients.append(r)
                continue
            reply = make(550, "5.7.1", f"recipient <{r.address}> is restricted ({hit})")
            refused.append(Entry(r.line, f"RCPT TO:<{r.address}>", reply, tx.mail_from))
        if len(recipients) == len(tx.recipients):
            kept.append(tx)
        elif recipients:
            kept.append(replace(tx, recipients=tuple(recipients)))
    if not refused:
        return env
    return replace(
        env,
        transactions=tuple(kept),
        response=tuple(sorted((*env.response, *refused), key=lambda e: e.line)),
        errors=tuple(sorted((*env.errors, *refused), key=lambda e: e.line)),
    )
