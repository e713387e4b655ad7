"""A fast SMTP sink for benchmarks, in the spirit of Postfix's smtp-sink: it accepts everything,
answers pipelined commands in order, counts messages, and keeps nothing.

    python scripts/sink.py [--host 127.0.0.1] [--port 0]

Prints ``PORT n`` on its first line once listening; prints ``COUNT n`` on each line it reads
from standard input (anything) and exits at end of input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


class Sink(asyncio.Protocol):
    count = 0

    def __init__(self) -> None:
        self.buf = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if self.buf.startswith(b".\r\n"):
                    end, skip = 0, 3
                elif end >= 0:
                    skip = end + 5
                else:
                    self.buf = self.buf[-4:]
                    break
                self.buf = self.buf[skip:]
                self.in_data = False
                Sink.count += 1
                out.append(b"250 2.0.0 sunk\r\n")
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl].upper(), self.buf[nl + 1 :]
            if line.startswith(b"EHLO"):
                out.append(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
            elif line.startswith(b"DATA"):
                out.append(b"354 go\r\n")
                self.in_data = True
            elif line.startswith(b"QUIT"):
                out.append(b"221 bye\r\n")
            else:
                out.append(b"250 ok\r\n")
        if out:
            self.transport.write(b"".join(out))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, args.host, args.port)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        print(f"COUNT {Sink.count}", flush=True)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
