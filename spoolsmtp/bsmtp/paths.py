"""The argument of MAIL FROM: and RCPT TO: read whole, pure: the path, qualified where the
job left the domain out (``<postmaster>`` is ours, RFC 5321 4.5.1; others only through the
configured rewriting), checked, with the command's parameters. The reader keeps the state.
"""

from __future__ import annotations

from collections.abc import Callable

from spoolsmtp.bsmtp.address import Mailbox, parse_path, plain_path
from spoolsmtp.bsmtp.params import NO_PARAMS, mail_params, rcpt_params, split_path
from spoolsmtp.model.config import Limits
from spoolsmtp.model.envelope import MailParams, Notify
from spoolsmtp.model.reply import Reply

# an address without a domain (``OPERATOR``) as the rewriting qualifies it, or None
Qualify = Callable[[str], str | None]
POSTMASTER = "<postmaster>"


def sender(
    arg: str, limits: Limits, unqualified: Qualify | None
) -> tuple[MailParams, Mailbox | None, Reply | None]:
    """MAIL's argument after ``FROM:``: its parameters, and its mailbox (None for ``<>``) or
    the reply that refuses it."""
    plain = plain_path(arg, limits)
    if plain is not None:  # the usual <a@b.c> alone: no parameters, nothing to qualify
        return NO_PARAMS, plain, None
    path, rest = split_path(arg)
    params, fault = mail_params(rest, limits)
    if fault is not None:
        return params, None, fault
    mailbox, fault = parse_path(
        qualified(path, unqualified), limits, sender=True, utf8=params.smtputf8
    )
    return params, mailbox, fault


def recipient(
    arg: str, limits: Limits, hostname: str, unqualified: Qualify | None, *, utf8: bool
) -> tuple[Mailbox | None, frozenset[Notify] | None, str | None, Reply | None]:
    """RCPT's argument after ``TO:``: its mailbox, NOTIFY and ORCPT, or the reply that refuses
    it. ``<postmaster>`` without a domain is accepted and is ours (``hostname``)."""
    plain = plain_path(arg, limits)
    if plain is not None:  # the usual <a@b.c> alone: no parameters, nothing to qualify
        return plain, None, None, None
    path, rest = split_path(arg)
    notify, orcpt, fault = rcpt_params(rest)
    if fault is not None:
        return None, notify, orcpt, fault
    if path.lower() == POSTMASTER:
        path = f"<{path[1:-1]}@{hostname}>"
    mailbox, fault = parse_path(qualified(path, unqualified), limits, sender=False, utf8=utf8)
    return mailbox, notify, orcpt, fault


def qualified(path: str, unqualified: Qualify | None) -> str:
    """``<OPERATOR>`` as the configured rewriting has it (``<operator@example.com>``)."""
    inner = path[1:-1]
    if unqualified is None or not inner or "@" in inner or not path.startswith("<"):
        return path
    full = unqualified(inner)
    return path if full is None else f"<{full}>"
