"""The RFC 1413 ident lookup behind TCPREMOTEINFO (tcpserver -r), as remoteinfo.c does it (docs/behaviour.md §6.9).

No dnspython here: tcpserver imports this module for every -r connection.
"""

from __future__ import annotations

import asyncio
import socket

from ucspi.server.descriptors import DESCRIPTORS

IDENT_PORT = 113

# remoteinfo.c stops collecting once the value is longer than 256 bytes: at most 257 are kept.
MAX_INFO_LENGTH = 256

# Bytes remoteinfo.c drops wherever they appear in the reply (docs/behaviour.md §9, item 10).
_DROPPED = b" \t\r"

# One read's worth; the original reads through a 128-byte buffer, the size only affects speed.
_READ_SIZE = 4096


class IdentReply:
    """The parser of remoteinfo.c's reply loop, fed chunk by chunk so a flood costs no memory."""

    def __init__(self) -> None:
        self.colons = 0
        self.value = bytearray()
        self.done = False

    def feed(self, chunk: bytes) -> bool:
        """Take more reply bytes; True once the answer is complete (newline seen or value full)."""
        if self.done:
            return True
        line, newline, _ = chunk.partition(b"\n")
        line = line.translate(None, _DROPPED)
        if self.colons < 3:
            # Everything up to and including the third colon is skipped (type and OS are not checked).
            for _ in range(3 - self.colons):
                colon = line.find(b":")
                if colon < 0:
                    line = b""
                    break
                self.colons += 1
                line = line[colon + 1 :]
        if self.colons >= 3 and line:
            room = MAX_INFO_LENGTH + 1 - len(self.value)
            self.value += line[:room]
            if len(self.value) > MAX_INFO_LENGTH:
                self.done = True
                return True
        if newline:
            self.done = True
        return self.done


def parse_reply(reply: bytes) -> bytes | None:
    """The info a complete reply yields, or None if it ends before a newline (the original fails then)."""
    parser = IdentReply()
    if parser.feed(reply):
        return bytes(parser.value)
    return None


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


async def remote_info(local_ip: str, local_port: int, remote_ip: str, remote_port: int, timeout: float) -> bytes | None:
    """Ask the client's identd who owns remote_port; None when the exchange fails or times out.

    The one deadline covers connect, send and receive together (docs/behaviour.md §6.9). It starts once the
    socket exists: the original's child never waits for a descriptor, ours may (descriptors.py),
    and that wait must not eat the identd's time. Never raises on network faults and never blocks
    the event loop.
    """
    if timeout <= 0:
        return None
    loop = asyncio.get_running_loop()
    try:
        sock = await DESCRIPTORS.socket(_family(remote_ip), socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        async with asyncio.timeout(timeout):
            # The query must leave from the address the client reached, or its identd cannot match it.
            sock.bind((local_ip, 0))
            await loop.sock_connect(sock, (remote_ip, IDENT_PORT))
            await loop.sock_sendall(sock, b"%d , %d\r\n" % (remote_port, local_port))
            parser = IdentReply()
            while True:
                chunk = await loop.sock_recv(sock, _READ_SIZE)
                if not chunk:
                    return None
                if parser.feed(chunk):
                    return bytes(parser.value)
    except (OSError, TimeoutError):
        return None
    finally:
        DESCRIPTORS.close(sock)
