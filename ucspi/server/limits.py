"""Per-address and per-network connection limits, decided before spawning (no child, no slot kept).

Off unless an option (-C, --max-per-ip, --max-per-net) or MAXCONNIP, MAXCONIP or MAXCONNC in
the server's environment at start switches them on; without that, a rule's MAXCONNIP is just a
variable, as in 0.88. Values per client: the matched rule's variable, else the start-up
environment, else the option. An empty value exempts the client; 0 refuses it (MAXCONIP=0 at
start means "no limit", as in ucspi-tcp6). A client at its limit is refused, never deferred:
`admit exactly n`, as tcpsvd -C, s6-tcpserverd -C, xinetd, systemd and the 0.88 limits patch.

Bookkeeping is two dictionaries of live counts, by address and by network: O(1) per accept and
per end, entries removed at zero. Each admitted connection holds a Ticket, given back once.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ucspi.numbers import scan_ulong

DEFAULT_LENGTHS = (24, 64)


@dataclass(frozen=True)
class LimitOption:
    """A limit as an option gives it: `n[:msg]`, or for networks `n[/len4[/len6]][:msg]`."""

    count: int
    message: bytes = b""
    lengths: tuple[int, int] = DEFAULT_LENGTHS


def unescape(text: str) -> bytes:
    """ipsvd's escapes: \\n, \\r and \\\\; any other backslash pair is kept as it is."""
    raw = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    position = 0
    while position < len(raw):
        byte = raw[position]
        if byte == 0x5C and position + 1 < len(raw):
            following = raw[position + 1]
            replacement = {0x6E: b"\n", 0x72: b"\r", 0x5C: b"\\"}.get(following)
            if replacement is not None:
                out += replacement
                position += 2
                continue
        out.append(byte)
        position += 1
    return bytes(out)


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > 9:
        raise ValueError(text)
    return int(text)


def parse_per_ip(text: str) -> LimitOption:
    """`n[:msg]` (-C and --max-per-ip)."""
    count, colon, message = text.partition(":")
    return LimitOption(_count(count), unescape(message) if colon else b"")


def parse_per_net(text: str) -> LimitOption:
    """`n[/len4[/len6]][:msg]` (--max-per-net); the lengths default to 24 and 64."""
    head, colon, message = text.partition(":")
    parts = head.split("/")
    if len(parts) > 3:
        raise ValueError(text)
    count = _count(parts[0])
    len4 = _count(parts[1]) if len(parts) > 1 else DEFAULT_LENGTHS[0]
    len6 = _count(parts[2]) if len(parts) > 2 else DEFAULT_LENGTHS[1]
    if len4 > 32 or len6 > 128:
        raise ValueError(text)
    return LimitOption(count, unescape(message) if colon else b"", (len4, len6))


_NO_LIMIT = -1  # the client is exempt, or no limit of that kind applies


def _value(raw: bytes) -> int:
    """A variable's value: empty exempts, otherwise the leading digits (the patch's atoi)."""
    return _NO_LIMIT if raw == b"" else scan_ulong(raw)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client is refused: the log line's suffix and the bytes written to the client."""

    suffix: bytes  # ` MAXCONNIP:n` or ` MAXCONNC:n/len`
    message: bytes
    # For the structured log: which limit, and the counts as they stood (a limit not applied: -1).
    reason: bytes = b"maxconnip"
    ip_count: int = 0
    per_ip: int = -1
    net_count: int = 0
    per_net: int = -1
    net: tuple[int, int] = (32, 0)
    net_length: int = 0

    def counts(self) -> tuple[int, int | None, int | None, int | None, bytes | None]:
        """(ipconns, ipmax, netconns, netmax, net): the limits that apply, None for those that do not."""
        if self.per_net == _NO_LIMIT:
            return self.ip_count, self.per_ip, None, None, None
        ip_max = None if self.per_ip == _NO_LIMIT else self.per_ip
        return self.ip_count, ip_max, self.net_count, self.per_net, network_text(self.net, self.net_length)


def network_text(net: tuple[int, int], length: int) -> bytes:
    """A network key of Limits.keys as text: `10.1.2.0/24`, `2001:db8::/64`."""
    bits, number = net
    family = socket.AF_INET if bits == 32 else socket.AF_INET6
    packed = (number << (bits - length) if length else 0).to_bytes(bits // 8, "big")
    return b"%s/%d" % (socket.inet_ntop(family, packed).encode(), length)


class Ticket:
    """One admitted connection's place in the counts; given back once, however often asked."""

    __slots__ = ("_counts", "_ip", "_net")

    def __init__(self, counts: Limits, ip: bytes, net: tuple[int, int]) -> None:
        self._counts: Limits | None = counts
        self._ip = ip
        self._net = net

    def give_back(self) -> None:
        counts = self._counts
        if counts is not None:
            self._counts = None
            counts.forget(self._ip, self._net)


class Limits:
    """The settings from the options and the start-up environment, and the live counts."""

    def __init__(
        self, per_ip: LimitOption | None, per_net: LimitOption | None, environ: Mapping[bytes, bytes]
    ) -> None:
        self.lengths = per_net.lengths if per_net is not None else DEFAULT_LENGTHS
        self._ip_message = per_ip.message if per_ip is not None else b""
        self._net_message = per_net.message if per_net is not None else b""
        self._per_ip = per_ip.count if per_ip is not None else _NO_LIMIT
        self._per_net = per_net.count if per_net is not None else _NO_LIMIT
        if b"MAXCONNIP" in environ:
            self._per_ip = _value(environ[b"MAXCONNIP"])
        elif b"MAXCONIP" in environ:
            value = _value(environ[b"MAXCONIP"])
            self._per_ip = _NO_LIMIT if value == 0 else value  # ucspi-tcp6: 0 at start means no limit
        if b"MAXCONNC" in environ:
            self._per_net = _value(environ[b"MAXCONNC"])
        self._die_message = environ[b"DIEMSG"] + b"\r\n" if b"DIEMSG" in environ else None
        self._by_ip: dict[bytes, int] = {}
        self._by_net: dict[tuple[int, int], int] = {}

    @classmethod
    def configured(
        cls, per_ip: LimitOption | None, per_net: LimitOption | None, environ: Mapping[bytes, bytes]
    ) -> Limits | None:
        """None when nothing switches limits on (a 0.88 command line and environment)."""
        if per_ip is None and per_net is None and not any(
            name in environ for name in (b"MAXCONNIP", b"MAXCONIP", b"MAXCONNC")
        ):
            return None
        return cls(per_ip, per_net, environ)

    def keys(self, rules_ip: bytes) -> tuple[bytes, tuple[int, int]]:
        """The address (packed; a v4-mapped client counts as IPv4) and its network's key."""
        text = rules_ip.decode("ascii", "replace")
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text)
            length, bits = self.lengths[1], 128
        else:
            packed = socket.inet_aton(text)
            length, bits = self.lengths[0], 32
        number = int.from_bytes(packed, "big")
        return packed, (bits, number >> (bits - length) if length else 0)

    def decide(
        self, rules_ip: bytes, rule_variables: Sequence[tuple[bytes, bytes]]
    ) -> tuple[Ticket | None, Refusal | None, int]:
        """(the admitted connection's ticket, or the refusal; the count from its address before it)."""
        per_ip, per_net, die_message = self._per_ip, self._per_net, self._die_message
        for name, value in rule_variables:  # the rule's own values come first; the last of a name wins
            if name == b"MAXCONNIP" or name == b"MAXCONIP":
                per_ip = _value(value)
            elif name == b"MAXCONNC":
                per_net = _value(value)
            elif name == b"DIEMSG":
                die_message = value + b"\r\n"
        ip, net = self.keys(rules_ip)
        from_ip = self._by_ip.get(ip, 0)
        if per_ip != _NO_LIMIT and from_ip >= per_ip:
            # When both limits hit, the per-address one is reported.
            message = die_message if die_message is not None else self._ip_message
            refusal = Refusal(
                b" MAXCONNIP:%d" % per_ip, message, b"maxconnip", from_ip, per_ip,
                self._by_net.get(net, 0), per_net, net, self._length(net),
            )  # fmt: skip
            return None, refusal, from_ip
        if per_net != _NO_LIMIT and (from_net := self._by_net.get(net, 0)) >= per_net:
            message = die_message if die_message is not None else self._net_message
            length = self._length(net)
            refusal = Refusal(
                b" MAXCONNC:%d/%d" % (per_net, length), message, b"maxconnc", from_ip, per_ip,
                from_net, per_net, net, length,
            )  # fmt: skip
            return None, refusal, from_ip
        self._by_ip[ip] = from_ip + 1
        self._by_net[net] = self._by_net.get(net, 0) + 1
        return Ticket(self, ip, net), None, from_ip

    def _length(self, net: tuple[int, int]) -> int:
        return self.lengths[1] if net[0] == 128 else self.lengths[0]

    def forget(self, ip: bytes, net: tuple[int, int]) -> None:
        _count_down(self._by_ip, ip)
        _count_down(self._by_net, net)


def _count_down(counts: dict, key: object) -> None:
    """One connection fewer under key; a count of 0 leaves no entry (memory follows live connections)."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
