"""Peer facts -> the rule that applies (docs/behaviour.md §5). The one lookup for tcpserver and tcprulescheck.

0.88's order, with the IPv6 build's prefixes (cut at "." or ":", docs/behaviour.md §8.1) and ucspi-tcp6's
CIDR keys, longest first, right after them (docs/behaviour.md §8.2):
INFO@IP, INFO@=HOST, IP, =HOST, IP prefixes, CIDR keys, =HOST suffixes, =, the empty key.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterator

from ucspi.address import (
    IPV4_CIDR_MARKER,
    IPV6_CIDR_MARKER,
    address_bits,
    cidr_from_key,
    format_ipv4,
    format_ipv6,
    format_network,
    is_v4_mapped,
    parse_ipv4,
    parse_ipv6,
)
from ucspi.rules.cidr import CIDR_LENGTHS_KEY, NO_CIDR, CidrLengths, decode_cidr_lengths

# A cdb reader's get(): the first record's data for a key, or None.
RecordGetter = Callable[[bytes], "bytes | None"]


class Decision(namedtuple("_DecisionFields", "key data cidr", defaults=(b"", False))):
    """The matching rule: its key and raw record data; key None means no rule matched; cidr
    True when the key is a CIDR key (tcprulescheck shows it as a network). A named tuple, not a
    dataclass: importing dataclasses would cost every tcprulescheck run a third of its start."""

    __slots__ = ()
    key: bytes | None
    data: bytes
    cidr: bool

    def chunks(self) -> Iterator[bytes]:
        """The NUL-terminated chunks of the data; a trailing chunk without NUL is ignored."""
        data = self.data
        start = 0
        while (end := data.find(b"\x00", start)) >= 0:
            yield data[start:end]
            start = end + 1

    @property
    def deny(self) -> bool:
        return any(chunk[:1] == b"D" for chunk in self.chunks())

    @property
    def environment(self) -> list[tuple[bytes, bytes]]:
        """The rule's variables in rule order; a `+` chunk without `=` is ignored as tcpserver does."""
        variables = []
        for chunk in self.chunks():
            if chunk[:1] == b"+":
                name, equals, value = chunk[1:].partition(b"=")
                if equals:
                    variables.append((name, value))
        return variables


NO_RULE = Decision(None)


def lookup_address(ip: bytes) -> tuple[bytes, bytes | None]:
    """TCPREMOTEIP -> (the text its keys are made of, the packed address for CIDR keys or None).

    An IPv6 address in any spelling becomes its RFC 5952 text (what tcprules stores); a
    v4-mapped one (`::ffff:1.2.3.4`, given under -6) becomes its dotted quad, so IPv4 rules and
    IPv4 CIDR apply to it. Any other string is used as it is, without CIDR (0.88 looks up any
    string). Cheap for a dotted quad: it is parsed only when CIDR keys are probed.
    """
    if b":" not in ip:
        return ip, None
    packed = parse_ipv6(ip)
    if packed is None:
        return ip, None
    if is_v4_mapped(packed):
        return format_ipv4(packed[12:]), packed[12:]
    return format_ipv6(packed), packed


def _leading_keys(ip: bytes, host: bytes | None, info: bytes | None) -> Iterator[bytes]:
    """Steps 1-5 of docs/behaviour.md §5: INFO@IP, INFO@=HOST, IP, =HOST, the IP's prefixes."""
    if info is not None:
        yield info + b"@" + ip
        if host is not None:
            yield info + b"@=" + host
    yield ip
    if host is not None:
        yield b"=" + host
    # Every prefix of the IP that ends in "." or ":" (docs/behaviour.md §8.1), longest first; any string, not
    # only IPs. No 0.88 key holds a ":", so cutting there too changes nothing for 0.88 files.
    for length in range(len(ip), 0, -1):
        if ip[length - 1] in b".:":
            yield ip[:length]


def _trailing_keys(host: bytes | None) -> Iterator[bytes]:
    """Steps 6-8 of docs/behaviour.md §5: the host's suffixes, `=`, the empty key."""
    if host is not None:
        for position in range(len(host)):
            if host[position] == 0x2E:
                yield b"=" + host[position:]
        yield b"="
    yield b""


def cidr_keys(packed: bytes | None, lengths: CidrLengths) -> Iterator[bytes]:
    """The CIDR keys of an address for the recorded lengths of its family, longest first."""
    if packed is None:
        return
    recorded = lengths.ipv4 if len(packed) == 4 else lengths.ipv6
    if not recorded:
        return
    marker = IPV4_CIDR_MARKER if len(packed) == 4 else IPV6_CIDR_MARKER
    bits = address_bits(packed)
    for length in recorded:
        yield marker + bits[:length]


def _cidr_address(ip: bytes, packed: bytes | None, lengths: CidrLengths) -> bytes | None:
    """The packed address for CIDR keys; a dotted quad is parsed only when IPv4 keys are probed."""
    if packed is None and lengths.ipv4:
        packed = parse_ipv4(ip)
    return packed


def _ordered_keys(
    ip: bytes, host: bytes | None, info: bytes | None, recorded: Callable[[], CidrLengths]
) -> Iterator[tuple[bytes, bool]]:
    """(key, is a CIDR key) in lookup order; the CIDR lengths are asked for only when reached."""
    ip, packed = lookup_address(ip)
    for key in _leading_keys(ip, host, info):
        yield key, False
    lengths = recorded()
    if lengths:
        for key in cidr_keys(_cidr_address(ip, packed, lengths), lengths):
            yield key, True
    for key in _trailing_keys(host):
        yield key, False


def candidate_keys(
    ip: bytes, host: bytes | None, info: bytes | None, lengths: CidrLengths = NO_CIDR
) -> Iterator[bytes]:
    """The keys to try, in order; host and info None when unset (not empty)."""
    return (key for key, _cidr in _ordered_keys(ip, host, info, lambda: lengths))


def read_cidr_lengths(get: RecordGetter) -> CidrLengths:
    """The CIDR lengths recorded in a rules file (none in a 0.88 file).

    A cdb error here means none: 0.88 never reads this key, so a damaged file fails (or not)
    on the keys the original probes, as it would there.
    """
    try:
        return decode_cidr_lengths(get(CIDR_LENGTHS_KEY))
    except OSError:
        return NO_CIDR


def find_rule(
    get: RecordGetter,
    ip: bytes,
    host: bytes | None,
    info: bytes | None,
    lengths: CidrLengths | None = None,
) -> Decision:
    """The first candidate key present in the rules; cdb errors (OSError) propagate.

    ip is TCPREMOTEIP as the server sets it: a dotted quad for IPv4 and v4-mapped clients
    (or `::ffff:a.b.c.d` under -6: looked up by its dotted quad all the same), RFC 5952 text
    for IPv6. lengths: the file's recorded CIDR lengths, read from it when not given (a server
    passes the copy it keeps with the open file).
    """
    def recorded() -> CidrLengths:
        return read_cidr_lengths(get) if lengths is None else lengths

    for key, cidr in _ordered_keys(ip, host, info, recorded):
        data = get(key)
        if data is not None:
            return Decision(key, data, cidr=cidr)
    return NO_RULE


def describe(decision: Decision) -> bytes:
    """tcprulescheck's report: the matching key, the variables, then allow or deny (docs/behaviour.md §4)."""
    if decision.key is None:
        return b"default:\nallow connection\n"
    shown = decision.key
    if decision.cidr and (network := cidr_from_key(decision.key)) is not None:
        shown = format_network(*network)  # `10.0.0.0/8`, not the key's bit characters
    lines = [b"rule " + shown + b":\n"]
    for chunk in decision.chunks():
        if chunk[:1] == b"D":
            lines.append(b"deny connection\n")  # the original stops at the deny marker
            return b"".join(lines)
        if chunk[:1] == b"+":
            lines.append(b"set environment variable " + chunk[1:] + b"\n")
    lines.append(b"allow connection\n")
    return b"".join(lines)
