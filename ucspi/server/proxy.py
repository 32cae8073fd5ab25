"""The PROXY protocol, v1 and v2, as a load balancer sends it (HAProxy's proxy-protocol.txt).

Two halves. The parser is pure: header_extent says how many bytes of what has arrived belong to
the header (never one past it), parse_header turns the complete header into a ProxyHeader or a
ProxyError naming what was wrong. read_header is the only I/O: it peeks, takes exactly the
header's bytes off the socket, and waits (with the deadline) only when the header is not
complete yet; a header that arrived in one segment costs no wait at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ucspi.address import parse_ipv4, parse_ipv6

# A socket address as Python gives it: (host, port) for IPv4, (host, port, flow, scope) for IPv6.
SocketAddress = tuple

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_LONGEST = 107  # `PROXY TCP6` with two full IPv6 addresses and 5-digit ports, CRLF included
V2_FIXED = 16  # signature, version and command, family and transport, length
# What the first peek asks for: a whole v1 line, or more than a v2 header without TLVs.
FIRST_PEEK = 108

# v2 address block sizes by family (high nibble of byte 14): UNSPEC, INET, INET6, UNIX.
_ADDRESS_BLOCK = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_STREAM = 0x1

_TLV_AUTHORITY = 0x02
_TLV_CRC32C = 0x03
_TLV_UNIQUE_ID = 0x05
_TLV_SSL = 0x20
_SSL_CLIENT_SSL = 0x01
# s6-networking's names for the TLVs it reads, and ours for the unique id.
_TLV_VARIABLES = {_TLV_AUTHORITY: b"SSL_TLS_SNI_SERVERNAME", _TLV_UNIQUE_ID: b"PROXY_UNIQUE_ID"}
_SSL_SUB_VARIABLES = {0x21: b"SSL_PROTOCOL", 0x22: b"SSL_PEER_CERT_CN", 0x23: b"SSL_CIPHER"}
TLV_VARIABLE_NAMES: tuple[bytes, ...] = (
    b"SSL_TLS_SNI_SERVERNAME",
    b"SSL_PROTOCOL",
    b"SSL_PEER_CERT_CN",
    b"SSL_CIPHER",
    b"PROXY_UNIQUE_ID",
)
_VALUE_LIMIT = 255
_UNIQUE_ID_LIMIT = 128  # the spec's own bound for UNIQUE_ID

VERSIONS = ("v1", "v2", "any")


class ProxyError(Exception):
    """A header that is not one: the reason, for `dropping connection, bad PROXY header ...: REASON`."""

    def __init__(self, reason: bytes) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete, valid header.

    source and destination are None for LOCAL, `UNKNOWN`, UNSPEC and the families we do not
    serve (UDP, UNIX): the connection keeps its real endpoints, as the spec asks.
    """

    version: int
    source: SocketAddress | None
    destination: SocketAddress | None
    variables: tuple[tuple[bytes, bytes], ...] = ()  # TLV values of interest, by variable name
    dropped: tuple[bytes, ...] = ()  # TLV values refused (a NUL, too long): for the -v log

    @property
    def local(self) -> bool:
        """A header without the client's addresses: a health check, or the balancer's own."""
        return self.source is None


# ---- how much of what has arrived is the header


def header_extent(data: bytes, version: str = "any") -> tuple[int, bool]:
    """(how many of data's first bytes are header, whether the header is complete).

    Never counts a byte past the header: a v1 line ends at its first CRLF, a v2 header after
    16 + its length. Raises ProxyError as soon as data cannot begin a valid header.
    """
    if not data:
        return 0, False
    if data[0] == 0x50 and version != "v2":  # "P"
        return _v1_extent(data)
    if data[0] == 0x0D and version != "v1":
        return _v2_extent(data)
    raise ProxyError(b"not a PROXY header" if version == "any" else b"not a PROXY %s header" % version.encode())


def _v1_extent(data: bytes) -> tuple[int, bool]:
    if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        raise ProxyError(b"not a PROXY header")
    # The line ends at its first LF, which must follow a CR: a lone LF (or CR) ends nothing.
    line_feed = data.find(b"\n", 0, V1_LONGEST)
    if line_feed >= 0:
        if data[line_feed - 1] != 0x0D:
            raise ProxyError(b"bare LF in v1 line")
        return line_feed + 1, True
    if len(data) >= V1_LONGEST:
        raise ProxyError(b"no CRLF within 107 bytes")
    return len(data), False


def _v2_extent(data: bytes) -> tuple[int, bool]:
    known = min(len(data), len(V2_SIGNATURE))
    if data[:known] != V2_SIGNATURE[:known]:
        raise ProxyError(b"bad v2 signature")
    if len(data) < V2_FIXED:
        return len(data), False
    if data[12] >> 4 != 2:
        raise ProxyError(b"bad v2 version")
    total = V2_FIXED + (data[14] << 8 | data[15])
    return min(total, len(data)), total <= len(data)


# ---- the complete header


def parse_header(header: bytes) -> ProxyHeader:
    """A complete header (as header_extent measured it) -> ProxyHeader; ProxyError if invalid."""
    if header.startswith(V1_PREFIX):
        return _parse_v1(header)
    return _parse_v2(header)


def _v1_port(text: bytes) -> int:
    # Decimal, no sign, no leading zero (but `0` itself), at most 65535.
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == 0x30):
        raise ProxyError(b"bad port in v1 line")
    port = int(text)
    if port > 65535:
        raise ProxyError(b"bad port in v1 line")
    return port


def _parse_v1(header: bytes) -> ProxyHeader:
    if not header.endswith(b"\r\n") or b"\r" in header[:-2]:
        raise ProxyError(b"bad v1 line")
    fields = header[len(V1_PREFIX) : -2].split(b" ")
    family = fields[0]
    if family == b"UNKNOWN":
        return ProxyHeader(1, None, None)  # the rest of the line is to be ignored
    if len(fields) != 5:
        raise ProxyError(b"bad v1 line" if family in (b"TCP4", b"TCP6") else b"bad v1 family")
    if family == b"TCP4":
        source, destination = parse_ipv4(fields[1]), parse_ipv4(fields[2])
        family_number = socket.AF_INET
    elif family == b"TCP6":
        # No dotted quad without a colon, no zone: parse_ipv6 takes only what inet_pton does.
        source, destination = parse_ipv6(fields[1]), parse_ipv6(fields[2])
        family_number = socket.AF_INET6
    else:
        raise ProxyError(b"bad v1 family")
    if source is None or destination is None:
        raise ProxyError(b"bad address in v1 line")
    source_port, destination_port = _v1_port(fields[3]), _v1_port(fields[4])
    return ProxyHeader(
        1,
        _address(family_number, source, source_port),
        _address(family_number, destination, destination_port),
    )


def _address(family: int, packed: bytes, port: int) -> SocketAddress:
    host = socket.inet_ntop(family, packed)
    return (host, port) if family == socket.AF_INET else (host, port, 0, 0)


def _parse_v2(header: bytes) -> ProxyHeader:
    command = header[12] & 0x0F
    if command == 0x0:
        # LOCAL: the balancer's own connection (a health check); its block is skipped unread.
        return ProxyHeader(2, None, None)
    if command != 0x1:
        raise ProxyError(b"bad v2 command")
    family, transport = header[13] >> 4, header[13] & 0x0F
    block = _ADDRESS_BLOCK.get(family)
    if block is None or transport > 2:
        raise ProxyError(b"bad v2 family")
    length = len(header) - V2_FIXED
    if length < block:
        raise ProxyError(b"v2 address block too short")
    variables, dropped = _tlvs(header, V2_FIXED + block)
    if transport != _STREAM or family not in (0x1, 0x2):
        return ProxyHeader(2, None, None, variables, dropped)  # UNSPEC, UDP, UNIX: the real endpoints
    if family == 0x1:
        source_port, destination_port = struct.unpack_from("!HH", header, V2_FIXED + 8)
        return ProxyHeader(
            2,
            _address(socket.AF_INET, header[16:20], source_port),
            _address(socket.AF_INET, header[20:24], destination_port),
            variables,
            dropped,
        )
    source_port, destination_port = struct.unpack_from("!HH", header, V2_FIXED + 32)
    return ProxyHeader(
        2,
        _address(socket.AF_INET6, header[16:32], source_port),
        _address(socket.AF_INET6, header[32:48], destination_port),
        variables,
        dropped,
    )


def _tlv_records(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of each TLV in data[start:end]; ProxyError when one overruns."""
    records = []
    position = start
    while position < end:
        if position + 3 > end:
            raise ProxyError(b"TLV past the end")
        kind, length = data[position], data[position + 1] << 8 | data[position + 2]
        value_start = position + 3
        position = value_start + length
        if position > end:
            raise ProxyError(b"TLV past the end")
        records.append((kind, value_start, position))
    return records


def _tlvs(header: bytes, start: int) -> tuple[tuple[tuple[bytes, bytes], ...], tuple[bytes, ...]]:
    variables: list[tuple[bytes, bytes]] = []
    dropped: list[bytes] = []

    def keep(name: bytes, value: bytes, limit: int = _VALUE_LIMIT) -> None:
        if b"\x00" in value or len(value) > limit:
            dropped.append(name)
        else:
            variables.append((name, value))

    for kind, value_start, value_end in _tlv_records(header, start, len(header)):
        if kind == _TLV_CRC32C:
            if value_end - value_start != 4:
                raise ProxyError(b"bad CRC32C TLV")
            zeroed = header[:value_start] + b"\x00\x00\x00\x00" + header[value_end:]
            if crc32c(zeroed) != int.from_bytes(header[value_start:value_end], "big"):
                raise ProxyError(b"bad CRC32C")
        elif kind in _TLV_VARIABLES:
            name = _TLV_VARIABLES[kind]
            keep(name, header[value_start:value_end], _UNIQUE_ID_LIMIT if kind == _TLV_UNIQUE_ID else _VALUE_LIMIT)
        elif kind == _TLV_SSL:
            if value_end - value_start < 5:
                raise ProxyError(b"bad SSL TLV")
            client = header[value_start]
            sub_records = _tlv_records(header, value_start + 5, value_end)
            if client & _SSL_CLIENT_SSL:  # as s6: the sub-TLVs count only over TLS
                for sub_kind, sub_start, sub_end in sub_records:
                    if sub_kind in _SSL_SUB_VARIABLES:
                        keep(_SSL_SUB_VARIABLES[sub_kind], header[sub_start:sub_end])
        # Every other type is skipped by its length, as the spec asks.
    return tuple(variables), tuple(dropped)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
        table.append(value)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B); a header is at most 64 KiB, most are < 100 bytes."""
    table = _CRC32C_TABLE
    value = 0xFFFFFFFF
    for byte in data:
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


# ---- whose header is read


class TrustedPeers:
    """--proxy-from: the only peers whose first bytes are a header (a v4-mapped peer as IPv4)."""

    __slots__ = ("_ranges4", "_ranges6")

    def __init__(self, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._ranges4 = [_range(n) for n in networks if n.version == 4]
        self._ranges6 = [_range(n) for n in networks if n.version == 6]

    def trusts(self, host: str) -> bool:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            if packed[:12] != b"\x00" * 10 + b"\xff\xff":
                number = int.from_bytes(packed, "big")
                return any(low <= number <= high for low, high in self._ranges6)
            packed = packed[12:]
        else:
            packed = socket.inet_aton(host)
        number = int.from_bytes(packed, "big")
        return any(low <= number <= high for low, high in self._ranges4)


def _range(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    return int(network.network_address), int(network.broadcast_address)


# ---- reading it off the connection


class ProxyTimeout(Exception):
    """No complete header within the deadline."""


async def read_header(
    sock: socket.socket, loop: asyncio.AbstractEventLoop, version: str, timeout: float
) -> ProxyHeader:
    """Exactly the header's bytes taken off sock (a blocking socket: every call here is
    MSG_DONTWAIT), waiting for readability only while it is incomplete, until timeout.

    Raises ProxyError, ProxyTimeout, EOFError (closed before a complete header) or OSError.
    """
    received = b""
    deadline: float | None = None
    while True:
        wanted = FIRST_PEEK - len(received)
        if len(received) >= V2_FIXED and received[0] == 0x0D:
            wanted = V2_FIXED + (received[14] << 8 | received[15]) - len(received)
        try:
            # Peeked, not read: what follows the header must stay for the program.
            peeked = sock.recv(wanted, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            if deadline is None:
                deadline = loop.time() + timeout
            await _readable(sock.fileno(), loop, deadline)
            continue
        if not peeked:
            raise EOFError
        data = received + peeked
        taken, complete = header_extent(data, version)
        received += sock.recv(taken - len(received), socket.MSG_DONTWAIT)
        if complete and len(received) == taken:
            return parse_header(received)
        # Incomplete: all of it is header, so nothing is left to make the socket readable again
        # until more arrives (a peeked remainder would wake us at once, again and again).


async def _readable(fd: int, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    if loop.time() >= deadline:
        raise ProxyTimeout
    waiter: asyncio.Future[bool] = loop.create_future()
    loop.add_reader(fd, _settle, waiter, True)
    timer = loop.call_at(deadline, _settle, waiter, False)
    try:
        if not await waiter:
            raise ProxyTimeout
    finally:
        loop.remove_reader(fd)
        timer.cancel()
        # uvloop made it non-blocking; the program gets a blocking socket, as from the original.
        os.set_blocking(fd, True)


def _settle(waiter: asyncio.Future[bool], readable: bool) -> None:
    if not waiter.done():
        waiter.set_result(readable)
