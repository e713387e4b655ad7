"""The control socket: a Unix stream socket, one command per line, answers in text or JSON.

Protocol: a request line is ``[JSON ]COMMAND [ARGS...]``. A text answer is a status line
(``200 ...``, ``400 ...``, ``403 ...``, ``404 ...``, ``500 ...``), the answer's lines (dot-stuffed),
and a line holding only ``.``. A JSON answer is one line holding one object. ``FOLLOW`` (after
TRACE) streams trace lines until the client goes away.

Two sockets serve the same commands: the public one (``control.socket``) and the operators'
(``control.operator_socket``, 0600 or 0660 to ``control.operator_group``), which others cannot
reach and so cannot jam. Both are created by ``ctlsocket``, never chmod-ed by path.

Who may do what: the peer's uid and gid come from SO_PEERCRED, its supplementary groups from
SO_PEERGROUPS (the kernel's word, not the user database). HELP, QUERY and STATS are open to
anyone who can reach a socket; everything else needs root or a user or group listed in
``control.authorized_users`` / ``control.authorized_groups``. A refusal is answered and logged
with the peer's pid and uid. Lines are bounded, idle connections time out, connections per uid
are capped, no request can cause a traceback, and the log lines one uid can cause are capped
(``PeerLog``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import logging
import pwd
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# adopt, metrics and opcommands register their commands with commands.py when imported
from spoolsmtp.control import adopt, commands, metrics, opcommands  # noqa: F401
from spoolsmtp.control import sockets as ctlsocket
from spoolsmtp.control.peerlog import PeerLog
from spoolsmtp.control.port import ControlPort
from spoolsmtp.model import maillog
from spoolsmtp.model.config import ControlConfig
from spoolsmtp.model.errors import ConfigError

log = logging.getLogger("spoolsmtp")


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a control connection: ids and groups from the kernel."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """The peer's supplementary groups as the kernel saw them at connect (SO_PEERGROUPS),
    else from /proc/PID/status; never from the user database."""
    for size in (4096, 4 * 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return frozenset(int(g) for g in line.split()[1:])
    return frozenset()


@functools.lru_cache(maxsize=4)
def _allowed_ids(cfg: ControlConfig) -> tuple[frozenset[int], frozenset[int]]:
    """The configured users and groups as numbers, looked up once per configuration."""
    uids: set[int] = set()
    gids: set[int] = set()
    for user in cfg.authorized_users:
        with contextlib.suppress(KeyError):
            uids.add(int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid)
    for group in cfg.authorized_groups:
        with contextlib.suppress(KeyError):
            gids.add(int(group) if group.isdigit() else grp.getgrnam(group).gr_gid)
    return frozenset(uids), frozenset(gids)


def authorised(peer: Peer, cfg: ControlConfig) -> bool:
    """Root, or a listed user (name or uid), or a process in a listed group (name or gid):
    its primary or one of its supplementary groups, as the kernel reports them."""
    if peer.uid == 0:
        return True
    uids, gids = _allowed_ids(cfg)
    return peer.uid in uids or bool(gids & ({peer.gid} | peer.groups))


def frame_text(answer: commands.Answer) -> bytes:
    lines = [f"{answer.status} {answer.summary}"]
    lines += ["." + line if line.startswith(".") else line for line in answer.text]
    lines.append(".")
    return ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")


class ControlServer:
    """Serves the control sockets (the public one and the operators' own) for a worker, known
    only as its ``ControlPort``."""

    def __init__(self, port: ControlPort, path: Path, operator_path: Path | None = None) -> None:
        self.port = port
        self.path = path
        self.operator_path = operator_path
        self._servers: list[asyncio.Server] = []
        self._bound: list[ctlsocket.Bound] = []
        self._per_uid: Counter[int] = Counter()
        self._clients: set[asyncio.Task[None]] = set()
        self.peer_log = PeerLog(log)

    @property
    def cfg(self) -> ControlConfig:
        return self.port.cfg.control

    async def start(self) -> None:
        source = self.port.cfg.source
        # user and group names are looked up now (and after RELOAD), never per connection
        await asyncio.to_thread(_allowed_ids, self.cfg)
        public_gid = _gid(self.cfg.group, "control.group", source)
        sockets = [(self.path, self.cfg.mode_bits, public_gid, "control.socket", 0o755)]
        if self.operator_path is not None:
            gid = _gid(self.cfg.operator_group, "control.operator_group", source)
            mode, folder = (0o600, 0o700) if gid is None else (0o660, 0o710)
            sockets.append((self.operator_path, mode, gid, "control.operator_socket", folder))
        try:
            for path, mode, gid, key, folder in sockets:
                bound = await asyncio.to_thread(
                    ctlsocket.bind, path, mode, gid, key, source, folder
                )
                self._bound.append(bound)
                self._servers.append(
                    await asyncio.start_unix_server(
                        self._client,
                        sock=bound.sock,
                        limit=self.cfg.max_line + 2,
                        backlog=self.cfg.backlog,
                    )
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        for bound in self._bound:
            bound.remove()
        self._bound = []
        self.peer_log.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            peer = Peer.of(writer.get_extra_info("socket"))
        except OSError:
            self._clients.discard(task)
            writer.close()
            return
        self._per_uid[peer.uid] += 1
        try:
            if self._per_uid[peer.uid] > self.cfg.max_connections_per_uid:
                self.peer_log.warning(
                    peer.uid,
                    "control: too many connections from uid %d (pid %d)",
                    peer.uid,
                    peer.pid,
                )
                writer.write(b"503 too many connections from your uid\n.\n")
                await writer.drain()
                return
            await self._serve(peer, reader, writer)
        except (ConnectionError, asyncio.CancelledError, TimeoutError):
            pass
        except Exception as exc:
            self.peer_log.warning(
                peer.uid,
                "control: dropped the connection of pid %d uid %d: %s: %s",
                peer.pid,
                peer.uid,
                type(exc).__name__,
                exc,
            )
        finally:
            self._per_uid[peer.uid] -= 1
            if not self._per_uid[peer.uid]:
                del self._per_uid[peer.uid]
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
                if as_json:  # "JSON" and nothing else: a command is missing, say so
                    await self._send(
                        writer, commands.Answer(400, "JSON", text=["no command"]), True
                    )
                continue
            if verb in ("QUIT", "EXIT"):  # answered, so ctl does not think the worker died
                await self._send(
                    writer, commands.Answer(200, verb, {"bye": True}, ["bye"]), as_json
                )
                return
            if verb == "FOLLOW":
                if not authorised(peer, self.cfg):
                    await self._send(writer, self._refuse(peer, verb), as_json)
                    continue
                await self._follow(writer)
                return
            if commands.needs_authority(verb, args) and not authorised(peer, self.cfg):
                answer = self._refuse(peer, line)
            else:
                answer = await self._execute(peer, verb, args)
            await self._send(writer, answer, as_json)

    async def _execute(self, peer: Peer, verb: str, args: list[str]) -> commands.Answer:
        """Run a command; a failure is a 500 answer and one (rate-limited) log line."""
        try:
            opcommands.OPERATOR.set(peer.uid)  # this connection's task: who DELETE etc. log
            answer = await commands.execute(self.port, verb, args)
            if answer.status == commands.OK and verb != "QUERY" and commands.needs_authority(verb):
                # an operator's action, by whom: the mail log's line(s)
                said = answer.summary
                maillog.emit_all(
                    maillog.actions(answer.command, answer.data, peer.uid, peer.pid, said)
                )
            if verb == "RELOAD":
                await asyncio.to_thread(_allowed_ids, self.cfg)
            return answer
        except Exception as exc:
            self.peer_log.warning(
                peer.uid,
                "control: %s from pid %d uid %d failed: %s: %s",
                verb,
                peer.pid,
                peer.uid,
                type(exc).__name__,
                exc,
            )
            said = f"{verb} failed: {type(exc).__name__}: {exc}"
            return commands.Answer(commands.FAILED, verb, text=[said])

    def _refuse(self, peer: Peer, line: str) -> commands.Answer:
        verb = line.split(maxsplit=1)[0].upper() if line.split() else line
        self.peer_log.warning(
            peer.uid,
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
        tracer = self.port.tracer
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


def _gid(group: str | None, key: str, source: str) -> int | None:
    if not group:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ConfigError(source, key, f"no group {group!r}") from exc
