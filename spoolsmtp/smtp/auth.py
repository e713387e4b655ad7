"""SMTP AUTH as a client (RFC 4954): PLAIN (RFC 4616), else LOGIN, with a login from
``delivery.auth_file``.

The rules, decided here; the session only carries the lines:

* Credentials go out only on an encrypted connection, unless the route says
  ``auth_plaintext: true``: without TLS (not offered, or a failed handshake under
  ``opportunistic``) the session stops with ``451 4.7.4`` before AUTH, and nothing is sent.
* A server that offers neither PLAIN nor LOGIN: ``451 4.7.4`` naming what it offers.
* The server's own reply otherwise: ``235`` is success; ``535`` (bad credentials) fails the
  recipients of the route, ``454`` (temporary) defers them; each names the server and login.
* The trace shows the commands with the credentials hidden.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable

from spoolsmtp.model.login import Login
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.smtp.protocol import Event, Extensions

# sends one line of the dialogue (the second argument is what the trace shows instead)
Exchange = Callable[[str, str], Awaitable[Event]]
MECHANISMS = ("PLAIN", "LOGIN")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def plain_response(login: Login) -> str:
    """The PLAIN initial response: no authorisation identity, the user, the password."""
    return _b64(f"\0{login.username}\0{login.password}")


def refusal(
    login: Login, ext: Extensions, encrypted: bool, plaintext: bool, server: str
) -> Reply | None:
    """Why we will not try to log in to this server, or None."""
    if not encrypted and not plaintext:
        return make(
            451,
            "4.7.4",
            f"will not send login {login.name!r} to {server} without TLS "
            "(the route does not say auth_plaintext: true)",
        )
    if not any(m in ext.auth for m in MECHANISMS):
        offered = " ".join(sorted(ext.auth)) if ext.auth else "no AUTH at all"
        return make(451, "4.7.4", f"{server} offers no AUTH PLAIN or LOGIN ({offered})")
    return None


async def authenticate(
    login: Login, ext: Extensions, encrypted: bool, plaintext: bool, server: str, send: Exchange
) -> Reply | None:
    """Log in; None on success, else the reply that says why not (the server's, prefixed)."""
    why = refusal(login, ext, encrypted, plaintext, server)
    if why is not None:
        return why
    if "PLAIN" in ext.auth:
        event = await send(f"AUTH PLAIN {plain_response(login)}", "AUTH PLAIN (credentials)")
    else:
        event = await send("AUTH LOGIN", "AUTH LOGIN")
        for value, shown in ((login.username, "(user name)"), (login.password, "(password)")):
            if event.reply.code != 334:
                break
            event = await send(_b64(value), shown)
    reply = event.reply
    if reply.code == 235:
        return None
    if reply.code == 334:  # a challenge we have no answer to: cancel (RFC 4954 section 4)
        await send("*", "*")
        reply = make(454, "4.7.0", "unexpected AUTH challenge")
    text = f"{server} refused login {login.name!r}: {reply.lines[0]}"
    return Reply(reply.code, reply.enhanced, (text, *reply.lines[1:]))
