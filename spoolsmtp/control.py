"""The control socket: a Unix stream socket, one command per line, answers in text or JSON.

Protocol: a request line is ``[JSON ]COMMAND [ARGS...]``. A text answer is a status line
(``200 ...``, ``400 ...``, ``403 ...``, ``404 ...``, ``500 ...``), the answer's lines (dot-stuffed),
and a line holding only ``.``. A JSON answer is one line holding one object. ``FOLLOW`` (after
TRACE) streams trace lines until the client goes away.

Who may do what: the peer's uid and gid come from SO_PEERCRED when it connects. HELP, QUERY and
STATS are open to anyone who can reach the socket; everything else needs root or a user or group
listed in ``control.authorized_users`` / ``control.authorized_groups``. A refusal is answered
and logged with the peer's pid and uid. Lines are bounded, idle connections time out, and
connections per uid are capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spoolsmtp import commands
from spoolsmtp.config import ControlConfig
from spoolsmtp.errors import ConfigError

if TYPE_CHECKING:
    from spoolsmtp.worker import Worker

log = logging.getLogger("spoolsmtp")


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a control connection."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid)


def authorised(peer: Peer, cfg: ControlConfig) -> bool:
    """Root, or a listed user (name or uid), or a member of a listed group (name or gid)."""
    if peer.uid == 0:
        return True
    try:
        name: str | None = pwd.getpwuid(peer.uid).pw_name
    except KeyError:
        name = None
    if str(peer.uid) in cfg.authorized_users or (name and name in cfg.authorized_users):
        return True
    if not cfg.authorized_groups:
        return False
    gids = {peer.gid}
    if name:
        gids.update(os.getgrouplist(name, peer.gid))
    for gid in gids:
        if str(gid) in cfg.authorized_groups:
            return True
        with contextlib.suppress(KeyError):
            if grp.getgrgid(gid).gr_name in cfg.authorized_groups:
                return True
    return False


def frame_text(answer: commands.Answer) -> bytes:
    lines = [f"{answer.status} {answer.summary}"]
    lines += ["." + line if line.startswith(".") else line for line in answer.text]
    lines.append(".")
    return ("\n".join(lines) + "\n").encode("utf-8")


class ControlServer:
    """Serves the worker's control socket."""

    def __init__(self, worker: Worker, path: Path) -> None:
        self.worker = worker
        self.path = path
        self._server: asyncio.Server | None = None
        self._per_uid: Counter[int] = Counter()
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def cfg(self) -> ControlConfig:
        return self.worker.cfg.control

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if await _answers(self.path):
                raise ConfigError(
                    str(self.path), "control.socket", "another worker is answering on this socket"
                )
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(
            self._client, path=str(self.path), limit=self.cfg.max_line + 2
        )
        os.chmod(self.path, self.cfg.mode_bits)
        if self.cfg.group:
            try:
                gid = (
                    int(self.cfg.group)
                    if self.cfg.group.isdigit()
                    else grp.getgrnam(self.cfg.group).gr_gid
                )
            except KeyError as exc:
                raise ConfigError(
                    str(self.path), "control.group", f"no group {self.cfg.group!r}"
                ) from exc
            os.chown(self.path, -1, gid)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        peer = Peer.of(writer.get_extra_info("socket"))
        self._per_uid[peer.uid] += 1
        try:
            if self._per_uid[peer.uid] > self.cfg.max_connections_per_uid:
                log.warning(
                    "control: too many connections from uid %d (pid %d)", peer.uid, peer.pid
                )
                writer.write(b"503 too many connections from your uid\n.\n")
                await writer.drain()
                return
            await self._serve(peer, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._per_uid[peer.uid] -= 1
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(
        self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self.cfg.idle_timeout):
                    raw = await reader.readline()
            except TimeoutError:
                writer.write(b"408 idle too long\n.\n")
                await writer.drain()
                return
            except (ValueError, asyncio.LimitOverrunError):
                writer.write(
                    f"400 request line longer than {self.cfg.max_line} octets\n.\n".encode()
                )
                await writer.drain()
                return
            if not raw:
                return
            line = raw.decode("utf-8", "replace").strip()
            as_json = line.upper().startswith("JSON ") or line.upper() == "JSON"
            if as_json:
                line = line[4:].strip()
            verb, args = commands.parse(line)
            if not verb:
                continue
            if verb in ("QUIT", "EXIT"):
                return
            if verb == "FOLLOW":
                if not authorised(peer, self.cfg):
                    await self._send(writer, self._refuse(peer, verb), as_json)
                    continue
                await self._follow(writer)
                return
            if commands.needs_authority(verb) and not authorised(peer, self.cfg):
                answer = self._refuse(peer, line)
            else:
                answer = await commands.execute(self.worker, verb, args)
            await self._send(writer, answer, as_json)

    def _refuse(self, peer: Peer, line: str) -> commands.Answer:
        verb = line.split(maxsplit=1)[0].upper() if line.split() else line
        log.warning(
            "control: refused %r from pid %d uid %d gid %d: not authorised",
            line[:80],
            peer.pid,
            peer.uid,
            peer.gid,
        )
        text = f"refused: {verb} needs root or an authorised user or group (you are uid {peer.uid})"
        return commands.Answer(commands.REFUSED, line, text=[text])

    async def _send(
        self, writer: asyncio.StreamWriter, answer: commands.Answer, as_json: bool
    ) -> None:
        data = (answer.as_json() + "\n").encode() if as_json else frame_text(answer)
        writer.write(data)
        async with asyncio.timeout(self.cfg.idle_timeout):
            await writer.drain()

    async def _follow(self, writer: asyncio.StreamWriter) -> None:
        tracer = self.worker.tracer
        queue = tracer.follow()
        try:
            writer.write(b"200 following the trace; close the connection to stop\n")
            await writer.drain()
            for line in list(tracer.ring)[-20:]:
                writer.write(line.encode("utf-8", "replace") + b"\n")
            while True:
                line = await queue.get()
                writer.write(line.encode("utf-8", "replace") + b"\n")
                async with asyncio.timeout(self.cfg.idle_timeout):
                    await writer.drain()
        finally:
            tracer.unfollow(queue)


async def _answers(path: Path) -> bool:
    """Whether a live worker answers on an existing socket path (else it is stale)."""
    try:
        async with asyncio.timeout(2.0):
            _, writer = await asyncio.open_unix_connection(str(path))
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
