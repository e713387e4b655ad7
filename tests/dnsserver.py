"""An in-process authoritative DNS server on loopback, over real UDP and TCP, for tests.

Answers are built with dnspython's own message classes. Each name can be given records, or a
behaviour: NXDOMAIN, SERVFAIL, silence (no answer at all), or truncation over UDP (the full
answer only over TCP). With ``negative_ttl`` set, negative answers (NXDOMAIN, no such record)
carry an SOA (RFC 2308) whose minimum field is that many seconds and whose TTL is ``ttl``.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

NXDOMAIN = "NXDOMAIN"
SERVFAIL = "SERVFAIL"
SILENT = "SILENT"
TRUNCATE = "TRUNCATE"


@dataclass
class Zone:
    """Records by (name, type): a list of rdata texts; behaviours by name."""

    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    behaviour: dict[str, str] = field(default_factory=dict)
    ttl: int = 300
    queries: list[tuple[str, str, str]] = field(default_factory=list)
    # names at or under these are "signed": answers to queries asking for AD or DO carry the
    # AD bit, as a validating resolver's would (the test stands in for one)
    signed: set[str] = field(default_factory=set)
    negative_ttl: int | None = None

    def add(self, name: str, rdtype: str, *rdatas: str) -> None:
        self.records.setdefault((_norm(name), rdtype.upper()), []).extend(rdatas)

    def answer(self, query: dns.message.Message, transport: str) -> dns.message.Message | None:
        question = query.question[0]
        name = _norm(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((transport, name, rdtype))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        wants_ad = query.flags & dns.flags.AD or query.ednsflags & dns.flags.DO
        if wants_ad and any(name == z or name.endswith("." + z) for z in self.signed):
            response.flags |= dns.flags.AD
        how = self.behaviour.get(name)
        if how == SILENT:
            return None
        if how == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if how == TRUNCATE and transport == "udp":
            response.flags |= dns.flags.TC
            return response
        rdatas = self.records.get((name, rdtype))
        if rdatas:
            response.answer.append(
                dns.rrset.from_text_list(name + ".", self.ttl, "IN", rdtype, rdatas)
            )
        else:
            if how == NXDOMAIN or not any(key[0] == name for key in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
            if self.negative_ttl is not None:
                apex = ".".join(name.split(".")[-2:]) + "."
                soa = f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {self.negative_ttl}"
                response.authority.append(
                    dns.rrset.from_text_list(apex, self.ttl, "IN", "SOA", [soa])
                )
        return response


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class _Udp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        zone: Zone = self.server.zone  # type: ignore[attr-defined]
        reply = zone.answer(dns.message.from_wire(data), "udp")
        if reply is not None:
            sock.sendto(reply.to_wire(), self.client_address)


class _Tcp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        zone: Zone = self.server.zone  # type: ignore[attr-defined]
        head = sock.recv(2)
        if len(head) < 2:
            return
        (size,) = struct.unpack("!H", head)
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                return
            data += chunk
        reply = zone.answer(dns.message.from_wire(data), "tcp")
        if reply is not None:
            wire = reply.to_wire()
            sock.sendall(struct.pack("!H", len(wire)) + wire)


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def serve(zone: Zone, host: str = "127.0.0.1") -> Iterator[int]:
    """Serve ``zone`` on UDP and TCP on the same free port; yield the port."""
    for _ in range(20):
        udp = _UdpServer((host, 0), _Udp)
        port = udp.server_address[1]
        try:
            tcp = _TcpServer((host, port), _Tcp)
        except OSError:
            udp.server_close()
            continue
        break
    else:
        raise RuntimeError("no free port for the test DNS server")
    udp.zone = tcp.zone = zone  # type: ignore[attr-defined]
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for s in (udp, tcp)
    ]
    for t in threads:
        t.start()
    try:
        yield port
    finally:
        for s in (udp, tcp):
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(5)
