"""djb's stub resolver, as tcpserver uses it: PTR names for TCPLOCALHOST/TCPREMOTEHOST, A records for -p.

Behaviour follows djbdns's dns_resolve/dns_transmit (docs/behaviour.md §6.8, 9 item 16): servers from
$DNSCACHEIP or /etc/resolv.conf (never /etc/hosts), UDP rounds of 3, 11 and 45 s over every server
(dns_transmit's 1 s round is skipped for recursive queries), TCP when a reply is truncated.
dnspython builds the queries and decodes names; the transport is plain non-blocking sockets on
the running (uv)loop.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
from collections.abc import Iterator, Mapping, Sequence

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.reversename

from ucspi.address import literal_ipv4_addresses as literal_ip4s
from ucspi.server.descriptors import DESCRIPTORS

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"

# dns_transmit.c's UDP rounds; every round tries every server before the next one starts.
DEFAULT_TIMEOUTS: tuple[float, ...] = (1, 3, 11, 45)
# dns_resolve asks for recursion, which makes dns_transmit start at the second round: 3+11+45 s.
_FIRST_RECURSIVE_ROUND = 1
# In this round dns_transmit ignores socket errors and SERVFAILs and waits the round out.
_PATIENT_ROUND = 2
# dns_transmit.c: 10 s to connect and send over TCP, then 10 s more for the whole reply.
TCP_TIMEOUT: float = 10
# dns_rcip.c keeps 64 bytes of addresses: 16 servers.
MAX_SERVERS = 16
# A UDP reply that fills this buffer is ignored as oversized, as dns_transmit's 513-byte buffer does.
_UDP_BUFFER = 513
# Bound on back-to-back socket errors while waiting out one patient round (they are one-shot ICMP).
_MAX_ERRORS_PER_ROUND = 100
# Room for a burst of junk before the answer (the kernel caps it at net.core.rmem_max): the
# original's child drains its socket at C speed, ours shares the loop with every other query.
_UDP_RECEIVE_BUFFER = 1 << 20
# Datagrams read per wakeup: one query's junk cannot hold the loop from the others for long.
_DATAGRAMS_PER_WAKEUP = 128

_HEADER_LENGTH = 12
_FLAG_TC = 0x02
_RCODE_NXDOMAIN = 3


class _Malformed(ValueError):
    """A reply the parser cannot walk: the lookup fails, as dns_packet_copy returning 0 does."""


# ---------------------------------------------------------------- pure text functions


def printable_name(labels: Sequence[bytes]) -> bytes:
    """A domain name as tcpserver shows it (dns_domain_todot_cat, docs/behaviour.md §6.8).

    labels: the name's labels without the empty root label. Lower-cased; every byte other than
    a-z 0-9 - _ becomes a backslash and three octal digits; no trailing dot; the root is ".".
    """
    if not labels:
        return b"."
    out = bytearray()
    for index, label in enumerate(labels):
        if index:
            out += b"."
        for byte in label:
            if 0x41 <= byte <= 0x5A:
                byte += 0x20
            if 0x61 <= byte <= 0x7A or 0x30 <= byte <= 0x39 or byte in b"-_":
                out.append(byte)
            else:
                out += b"\\%03o" % byte
    return bytes(out)


def labels_from_printable(text: bytes) -> tuple[bytes, ...] | None:
    """The labels of a name in the escaped text form (dns_domain_fromdot); None if too long.

    Empty labels vanish; a backslash takes up to three octal digits, or else quotes the next byte.
    """
    labels: list[bytes] = []
    label = bytearray()
    wire_length = 1
    position = 0
    while position < len(text):
        byte = text[position]
        position += 1
        if byte == 0x2E:
            if label:
                wire_length += 1 + len(label)
                if wire_length > 255:
                    return None
                labels.append(bytes(label))
                label.clear()
            continue
        if byte == 0x5C:
            if position >= len(text):
                break
            byte = text[position]
            position += 1
            if 0x30 <= byte <= 0x37:
                byte -= 0x30
                for _ in range(2):
                    if position < len(text) and 0x30 <= text[position] <= 0x37:
                        byte = byte * 8 + text[position] - 0x30
                        position += 1
                    else:
                        break
                byte &= 0xFF
        if len(label) >= 63:
            return None
        label.append(byte)
    if label:
        wire_length += 1 + len(label)
        if wire_length > 255:
            return None
        labels.append(bytes(label))
    return tuple(labels)


def _dotted(octets: Sequence[int]) -> str:
    return ".".join(str(octet) for octet in octets)


def _scan_ip4(data: bytes, position: int) -> tuple[str, int] | None:
    """ip4_scan: four decimal numbers joined by dots at data[position:]; (address, length) or None."""
    start = position
    octets: list[int] = []
    for part in range(4):
        if part:
            if position >= len(data) or data[position] != 0x2E:
                return None
            position += 1
        digits_start = position
        value = 0
        while position < len(data) and 0x30 <= data[position] <= 0x39:
            value = (value * 10 + data[position] - 0x30) & 0xFF
            position += 1
        if position == digits_start:
            return None
        octets.append(value)
    return _dotted(octets), position - start


def parse_dnscacheip(value: bytes) -> list[str]:
    """$DNSCACHEIP as dns_rcip.c reads it: dotted quads run together with dots between them.

    b"10.0.0.1.10.0.0.2" is two servers; reading stops at the first other byte, so a space or
    comma ends the list. At most 16.
    """
    servers: list[str] = []
    position = 0
    while len(servers) < MAX_SERVERS:
        if position < len(value) and value[position] == 0x2E:
            position += 1
            continue
        scanned = _scan_ip4(value, position)
        if scanned is None:
            break
        servers.append(scanned[0])
        position += scanned[1]
    return servers


def parse_resolv_conf(data: bytes) -> list[str]:
    """The IPv4 `nameserver` lines of resolv.conf text, as dns_rcip.c reads them; 0.0.0.0 means 127.0.0.1."""
    servers: list[str] = []
    for line in data.split(b"\n"):
        if not (line.startswith(b"nameserver ") or line.startswith(b"nameserver\t")):
            continue
        rest = line[10:].lstrip(b" \t")
        scanned = _scan_ip4(rest, 0)
        if scanned is not None and len(servers) < MAX_SERVERS:
            servers.append("127.0.0.1" if scanned[0] == "0.0.0.0" else scanned[0])
    return servers


# ---------------------------------------------------------------- reply parsing


def _u16(packet: bytes, position: int) -> int:
    if position + 2 > len(packet):
        raise _Malformed("truncated")
    return int.from_bytes(packet[position : position + 2], "big")


def _skip_name(packet: bytes, position: int) -> int:
    _, used = dns.name.from_wire(packet, position)
    return position + used


def _relevant(packet: bytes, query_id: int, qname: dns.name.Name, rdtype: int) -> bool:
    """Not `irrelevant()` in dns_transmit.c: our id, one question, our name, type and class.

    The QR bit and the rcode are not looked at here, as in the original.
    """
    try:
        if len(packet) < _HEADER_LENGTH or _u16(packet, 0) != query_id or _u16(packet, 4) != 1:
            return False
        name, used = dns.name.from_wire(packet, _HEADER_LENGTH)
        position = _HEADER_LENGTH + used
        return name == qname and _u16(packet, position) == rdtype and _u16(packet, position + 2) == dns.rdataclass.IN
    except (_Malformed, dns.exception.DNSException):
        return False


def _wants_tcp(packet: bytes) -> bool:
    return bool(packet[2] & _FLAG_TC)


def _server_failed(packet: bytes) -> bool:
    # NXDOMAIN is an answer (no name), every other non-zero rcode sends dns_transmit to the next server.
    return (packet[3] & 0x0F) not in (0, _RCODE_NXDOMAIN)


def _answer_records(packet: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, class, rdata position, rdata length) of each answer, walked lazily as dns_name_packet does.

    The question's type and class are skipped unread; a record that runs off the end fails the lookup.
    """
    count = _u16(packet, 6)
    position = _skip_name(packet, _HEADER_LENGTH) + 4
    for _ in range(count):
        position = _skip_name(packet, position)
        if position + 10 > len(packet):
            raise _Malformed("truncated record header")
        rdtype, rdclass, length = _u16(packet, position), _u16(packet, position + 2), _u16(packet, position + 8)
        position += 10
        yield rdtype, rdclass, position, length
        position += length


def first_ptr_name(packet: bytes) -> bytes:
    """The first PTR answer in printable form, b"" when there is none (dns_name_packet)."""
    for rdtype, rdclass, position, _ in _answer_records(packet):
        if rdtype == dns.rdatatype.PTR and rdclass == dns.rdataclass.IN:
            target, _ = dns.name.from_wire(packet, position)
            return printable_name(target.labels[:-1])
    return b""


def addresses_in(packet: bytes, rdtype: int = dns.rdatatype.A) -> list[str]:
    """Every A (or AAAA) answer of the right size, in answer order (dns_ip4_packet, without its shuffle)."""
    size = 4 if rdtype == dns.rdatatype.A else 16
    found = []
    for record_type, record_class, position, length in _answer_records(packet):
        if record_type == rdtype and record_class == dns.rdataclass.IN and length == size:
            rdata = packet[position : position + size]
            if len(rdata) < size:
                raise _Malformed("truncated address")
            found.append(str(ipaddress.ip_address(rdata)))
    return found


# ---------------------------------------------------------------- transport


class _Outcome(enum.Enum):
    NEXT = "this server gave nothing usable: try the next one"
    USE_TCP = "the reply was truncated: start again over TCP"


def _query(qname: dns.name.Name, rdtype: int) -> tuple[int, bytes]:
    # make_query sets RD and a random id; no EDNS, like djb's 12-byte header plus question.
    query = dns.message.make_query(qname, rdtype, use_edns=False)
    return query.id, query.to_wire()


class StubResolver:
    """A djb-style stub resolver; one per process is enough, it holds no sockets between lookups."""

    def __init__(
        self,
        servers: Sequence[str],
        *,
        timeouts: Sequence[float] = DEFAULT_TIMEOUTS,
        tcp_timeout: float = TCP_TIMEOUT,
        port: int = DNS_PORT,
    ) -> None:
        # 0.0.0.0 entries are holes dns_transmit skips; only the first 16 fit in dns_rcip's table.
        self.servers: tuple[str, ...] = tuple(s for s in servers[:MAX_SERVERS] if s != "0.0.0.0")
        self.timeouts = tuple(timeouts)
        self.tcp_timeout = tcp_timeout
        self.port = port

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[bytes, bytes],
        *,
        resolv_conf: str = RESOLV_CONF,
        timeouts: Sequence[float] = DEFAULT_TIMEOUTS,
        tcp_timeout: float = TCP_TIMEOUT,
        port: int = DNS_PORT,
    ) -> StubResolver:
        """Servers from $DNSCACHEIP, else resolv.conf's nameserver lines, else 127.0.0.1 (dns_rcip.c).

        A resolv.conf that exists but cannot be read makes every lookup fail, as in the original.
        """
        servers: list[str] = []
        value = environ.get(b"DNSCACHEIP")
        if value is not None:
            servers = parse_dnscacheip(value)
        if not servers:
            try:
                with open(resolv_conf, "rb") as file:
                    servers = parse_resolv_conf(file.read())
            except FileNotFoundError:
                pass
            except OSError:
                return cls((), timeouts=timeouts, tcp_timeout=tcp_timeout, port=port)
        if not servers:
            servers = ["127.0.0.1"]
        return cls(servers, timeouts=timeouts, tcp_timeout=tcp_timeout, port=port)

    async def name_of(self, ip: str) -> bytes | None:
        """The first PTR name of ip in printable form (docs/behaviour.md §6.8), or None: no answer, no name, or failure.

        A PTR to the root comes back as b".", which tcpserver, like the original, treats as a name.
        """
        try:
            qname = dns.reversename.from_address(ip)
            packet = await self.resolve(qname, dns.rdatatype.PTR)
            if packet is None:
                return None
            return first_ptr_name(packet) or None
        except (OSError, ValueError, dns.exception.DNSException):
            return None

    async def addresses_of(self, name: bytes) -> list[str]:
        """The IPv4 addresses of a printable name (dns_ip4); [] on failure. Dotted quads are not looked up."""
        literal = literal_ip4s(name)
        if literal is not None:
            return literal
        return await self._addresses(name, dns.rdatatype.A)

    async def addresses6_of(self, name: bytes) -> list[str]:
        """The IPv6 addresses (AAAA) of a printable name, compact form; [] on failure. Not in 0.88."""
        try:
            return [str(ipaddress.IPv6Address(name.decode("ascii")))]
        except (UnicodeDecodeError, ValueError):
            pass
        return await self._addresses(name, dns.rdatatype.AAAA)

    async def _addresses(self, name: bytes, rdtype: int) -> list[str]:
        try:
            labels = labels_from_printable(name)
            if labels is None:
                return []
            packet = await self.resolve(dns.name.Name((*labels, b"")), rdtype)
            if packet is None:
                return []
            return addresses_in(packet, rdtype)
        except (OSError, ValueError, dns.exception.DNSException):
            return []

    async def resolve(self, qname: dns.name.Name, rdtype: int) -> bytes | None:
        """The raw reply to one recursive query, or None when every server and round failed."""
        for round_number in range(_FIRST_RECURSIVE_ROUND, len(self.timeouts)):
            for server in self.servers:
                outcome = await self._udp_exchange(server, qname, rdtype, round_number)
                if outcome is _Outcome.USE_TCP:
                    return await self._tcp_resolve(qname, rdtype)
                if isinstance(outcome, bytes):
                    return outcome
        return None

    async def _udp_exchange(
        self, server: str, qname: dns.name.Name, rdtype: int, round_number: int
    ) -> bytes | _Outcome:
        loop = asyncio.get_running_loop()
        query_id, wire = _query(qname, rdtype)
        # No socket fails the whole lookup, as in dns_transmit; the gate only gives up when no
        # descriptor can come back.
        sock = await DESCRIPTORS.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RECEIVE_BUFFER)
            except OSError:
                pass  # the default buffer still works, with less room for junk
            # Connected, so the kernel drops datagrams from elsewhere and reports ICMP refusals:
            # with the id and question checked, a reply must match its source and its query.
            try:
                sock.connect((server, self.port))
                if sock.send(wire) != len(wire):
                    return _Outcome.NEXT
            except OSError:
                return _Outcome.NEXT
            inbox = _Inbox(loop, sock, query_id, qname, rdtype, patient=round_number == _PATIENT_ROUND)
            loop.add_reader(sock.fileno(), inbox.on_readable)
            try:
                # The round's clock starts once the socket exists: a wait for a descriptor (which
                # the original's child never has) must not use up the server's time to answer.
                async with asyncio.timeout(self.timeouts[round_number]):
                    return await inbox.outcome
            except TimeoutError:
                return _Outcome.NEXT
            finally:
                loop.remove_reader(sock.fileno())
        finally:
            DESCRIPTORS.close(sock)

    async def _tcp_resolve(self, qname: dns.name.Name, rdtype: int) -> bytes | None:
        # After a truncated reply dns_transmit asks every server over TCP, from the first, and never returns to UDP.
        for server in self.servers:
            packet = await self._tcp_exchange(server, qname, rdtype)
            if packet is not None:
                return packet
        return None

    async def _tcp_exchange(self, server: str, qname: dns.name.Name, rdtype: int) -> bytes | None:
        loop = asyncio.get_running_loop()
        query_id, wire = _query(qname, rdtype)
        # As over UDP: no socket fails the lookup, and the 10 s start once the socket exists.
        sock = await DESCRIPTORS.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            async with asyncio.timeout(self.tcp_timeout):
                await loop.sock_connect(sock, (server, self.port))
                await loop.sock_sendall(sock, len(wire).to_bytes(2, "big") + wire)
            async with asyncio.timeout(self.tcp_timeout):
                length = int.from_bytes(await _recv_exactly(loop, sock, 2), "big")
                packet = await _recv_exactly(loop, sock, length)
        except (OSError, TimeoutError, EOFError):
            return None
        finally:
            DESCRIPTORS.close(sock)
        if not _relevant(packet, query_id, qname, rdtype) or _wants_tcp(packet) or _server_failed(packet):
            return None
        return packet


class _Inbox:
    """The datagrams of one UDP exchange, read by the loop's reader callback (no task step each).

    Each wakeup reads at most _DATAGRAMS_PER_WAKEUP; the reader stays registered, so a socket
    with more queued is read again after the loop's other callbacks: one query's junk cannot
    starve the others. The first reply that settles the exchange resolves `outcome`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        query_id: int,
        qname: dns.name.Name,
        rdtype: int,
        *,
        patient: bool,
    ) -> None:
        self.outcome: asyncio.Future[bytes | _Outcome] = loop.create_future()
        self._loop = loop
        self._sock = sock
        self._query_id = query_id
        self._qname = qname
        self._rdtype = rdtype
        self._patient = patient
        self._errors = 0

    def on_readable(self) -> None:
        if self.outcome.done():
            return
        try:
            for _ in range(_DATAGRAMS_PER_WAKEUP):
                try:
                    packet = self._sock.recv(_UDP_BUFFER)
                except BlockingIOError:
                    return
                except OSError:
                    packet = b""
                settled = self._settles(packet)
                if settled is not None:
                    self.outcome.set_result(settled)
                    return
        except Exception as error:  # the coroutine raises it, as when it read the socket itself
            self.outcome.set_exception(error)

    def _settles(self, packet: bytes) -> bytes | _Outcome | None:
        """What this datagram means for the exchange; None: keep waiting."""
        if not packet:
            # An error or an empty datagram: dns_transmit moves on, except in the patient round.
            self._errors += 1
            if not self._patient:
                return _Outcome.NEXT
            if self._errors >= _MAX_ERRORS_PER_ROUND:
                # Too many to keep reading: wait the round out deaf, as the original's poll would.
                self._loop.remove_reader(self._sock.fileno())
            return None
        if len(packet) >= _UDP_BUFFER or not _relevant(packet, self._query_id, self._qname, self._rdtype):
            return None
        if _wants_tcp(packet):
            return _Outcome.USE_TCP
        if _server_failed(packet):
            return None if self._patient else _Outcome.NEXT
        return packet


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, length: int) -> bytes:
    """length bytes from a stream socket (at most 65535 here); EOFError if the peer closes first."""
    data = bytearray()
    while len(data) < length:
        chunk = await loop.sock_recv(sock, length - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)
