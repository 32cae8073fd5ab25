"""IP addresses as rules and environments spell them: parsing, RFC 5952 text, CIDR keys.

Pure functions on bytes, no I/O. Addresses are packed (4 or 16 bytes, network order); text is
bytes, as everything the rules touch is.

CIDR keys are ucspi-tcp6's (docs/behaviour.md §8.2), so cdb files interoperate with it: one character per
prefix bit after a family marker. IPv4 `_`: bit k (0-based) is `0` when clear, else the k-th
character of `abcdefghijklmnopqrstuvwxyz123456`. IPv6 `^`: `0` when clear, else the j-th set bit
counted from the start gets the byte 0x60 + j - 1. Both are prefix-closed: the key of a /n is
the first n characters of the key of the whole address, which is what makes the lookup cheap.
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_pton  # not `socket` itself: tcprulescheck starts faster

IPV4_CIDR_MARKER = b"_"
IPV6_CIDR_MARKER = b"^"
_IPV4_BIT_CHARACTERS = b"abcdefghijklmnopqrstuvwxyz123456"
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

# The longest valid spellings are 39 (full groups) and 45 (mixed with a dotted quad) characters:
# anything longer is refused before any parsing, so hostile input costs nothing.
_MAX_IPV6_TEXT = 45
# An IPv4 octet as a rule writes it: decimal 0-255, no leading zero (inet_aton would read
# 010 as octal, so a leading zero is ambiguous).
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HEX_GROUP = rb"[0-9A-Fa-f]{1,4}"


class _Patterns:
    """The rule-text patterns, compiled at first use: the lookup side never needs them, and
    importing `re` would cost tcprulescheck's start about 5 ms."""

    def __init__(self) -> None:
        import re

        # Full dotted quad, or ucspi-tcp6's short form: one to three octets and a final dot (`10./8`).
        self.ipv4_cidr_address = re.compile(rb"(?:%s\.){3}%s|(?:%s\.){1,3}" % (_OCTET, _OCTET, _OCTET))
        self.prefix_length = re.compile(rb"[1-9][0-9]{0,2}")
        # A colon-terminated IPv6 prefix as the Debian IPv6 build matches it (docs/behaviour.md §8.1):
        # whole groups, each followed by `:`, with at most one `::`. (`A::` alone is a full address.)
        self.ipv6_prefix = re.compile(rb"(?:%s:){1,7}|(?:%s(?::%s){0,6})?::(?:%s:){1,6}" % ((_HEX_GROUP,) * 4))


_patterns: _Patterns | None = None


def _compiled() -> _Patterns:
    global _patterns
    if _patterns is None:
        _patterns = _Patterns()
    return _patterns


def parse_ipv4(text: bytes) -> bytes | None:
    """A dotted quad (four decimal octets, no leading zeros) -> 4 packed bytes, else None."""
    if len(text) > 15:
        return None
    try:
        # glibc's inet_pton takes exactly four decimal octets and refuses leading zeros.
        return inet_pton(AF_INET, text.decode("ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def parse_ipv6(text: bytes) -> bytes | None:
    """Any valid IPv6 spelling (compressed or not, either case, dotted-quad tail) -> 16 bytes.

    No zone (`%eth0`): TCPREMOTEIP never carries one (the interface goes to TCP6INTERFACE).
    """
    if len(text) > _MAX_IPV6_TEXT or b":" not in text:
        return None
    try:
        return inet_pton(AF_INET6, text.decode("ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def format_ipv4(packed: bytes) -> bytes:
    return b"%d.%d.%d.%d" % tuple(packed)


def is_v4_mapped(packed: bytes) -> bool:
    return len(packed) == 16 and packed[:12] == _V4_MAPPED_PREFIX


def format_ipv6(packed: bytes) -> bytes:
    """16 bytes -> RFC 5952 text: lower case, no leading zeros, the longest run of two or more
    zero groups (the first of equal runs) as `::`.

    Like glibc's inet_ntop (what the environment shows), `::ffff:0:0/96` and the deprecated
    v4-compatible `::a.b.c.d` end in a dotted quad.
    """
    groups = [packed[index] << 8 | packed[index + 1] for index in range(0, 16, 2)]
    best_start, best_length, start = -1, 0, -1
    for index, group in enumerate([*groups, 1]):  # the sentinel closes a run at the end
        if group == 0:
            if start < 0:
                start = index
        elif start >= 0:
            if index - start > best_length:
                best_start, best_length = start, index - start
            start = -1
    if best_length < 2:
        best_start = -1
    if best_start == 0 and (best_length == 6 or (best_length == 5 and groups[5] == 0xFFFF)):
        head = b"::ffff:" if best_length == 5 else b"::"
        return head + format_ipv4(packed[12:])
    if best_start < 0:
        return b":".join(b"%x" % group for group in groups)
    before = b":".join(b"%x" % group for group in groups[:best_start])
    after = b":".join(b"%x" % group for group in groups[best_start + best_length :])
    return before + b"::" + after


def normalise_ipv6_prefix(text: bytes) -> bytes | None:
    """A colon-terminated prefix (`2001:DB8:`) -> its groups as tcpserver prints them
    (`2001:db8:`), else None. Only whole groups: the lookup cuts the client's text at `:`.
    """
    if len(text) > _MAX_IPV6_TEXT or _compiled().ipv6_prefix.fullmatch(text) is None:
        return None
    head, double, tail = text.partition(b"::")
    parts = [b"%x" % int(group, 16) if group else b"" for group in head.split(b":")]
    if double:
        # `::` stands for at least one group and the last group is never followed by `:`, so a
        # prefix with `::` writes at most 6.
        if len([group for group in (head + b":" + tail).split(b":") if group]) > 6:
            return None
        return b":".join(parts) + b"::" + b"".join(b"%x:" % int(group, 16) for group in tail.split(b":")[:-1])
    return b":".join(parts)


# ---- CIDR keys (docs/behaviour.md §8.2) ----


def address_bits(packed: bytes) -> bytes:
    """The CIDR key characters of a whole address (32 or 128): the key of /n is its first n."""
    bits = int.from_bytes(packed, "big")
    width = len(packed) * 8
    characters = bytearray(width)
    if width == 32:
        for position in range(32):
            characters[position] = _IPV4_BIT_CHARACTERS[position] if bits >> (31 - position) & 1 else 0x30
    else:
        ones = 0
        for position in range(width):
            if bits >> (width - 1 - position) & 1:
                characters[position] = 0x60 + ones
                ones += 1
            else:
                characters[position] = 0x30
    return bytes(characters)


def cidr_key(packed: bytes, length: int) -> bytes:
    """The cdb key of the network packed/length: marker, then one character per prefix bit."""
    marker = IPV4_CIDR_MARKER if len(packed) == 4 else IPV6_CIDR_MARKER
    return marker + address_bits(packed)[:length]


def cidr_from_key(key: bytes) -> tuple[bytes, int] | None:
    """A CIDR key -> (network packed, prefix length), None if key is not one (bad characters,
    length 0 or too long)."""
    marker, characters = key[:1], key[1:]
    width = 32 if marker == IPV4_CIDR_MARKER else 128 if marker == IPV6_CIDR_MARKER else 0
    if not 1 <= len(characters) <= width:
        return None
    bits = 0
    for character in characters:
        bits <<= 1
        if character != 0x30:
            bits |= 1
    bits <<= width - len(characters)
    packed = bits.to_bytes(width // 8, "big")
    if cidr_key(packed, len(characters)) != key:
        return None  # a set bit spelled with the wrong character
    return packed, len(characters)


def format_network(packed: bytes, length: int) -> bytes:
    """`10.0.0.0/8`, `2001:db8::/32`: how tcprulescheck shows a CIDR rule."""
    text = format_ipv4(packed) if len(packed) == 4 else format_ipv6(packed)
    return b"%s/%d" % (text, length)


class CidrError(ValueError):
    """Text with a `/` that is not a network this syntax accepts."""


def parse_cidr(text: bytes) -> tuple[bytes, int]:
    """`10.0.0.0/8`, `10./8`, `2001:db8::/32` -> (network packed, prefix length).

    Refused (CidrError): a length outside 1-32 or 1-128 or with a leading zero, an address that
    is not one, set bits after the prefix (`10.1.0.0/8` is more likely a typo than meant as
    10.0.0.0/8, and an access rule should say what it matches), anything else.
    """
    address, slash, length_text = text.rpartition(b"/")
    if not slash or _compiled().prefix_length.fullmatch(length_text) is None:
        raise CidrError(text)
    length = int(length_text)
    if b":" in address:
        packed = parse_ipv6(address)
    elif _compiled().ipv4_cidr_address.fullmatch(address) is not None:
        octets = [int(octet) for octet in address.rstrip(b".").split(b".")]
        packed = bytes(octets + [0] * (4 - len(octets)))
    else:
        packed = None
    if packed is None or not 1 <= length <= len(packed) * 8:
        raise CidrError(text)
    width = len(packed) * 8
    if int.from_bytes(packed, "big") & ((1 << (width - length)) - 1):
        raise CidrError(text)
    return packed, length


def literal_ipv4_addresses(name: bytes) -> list[str] | None:
    """dns_ip4's shortcut: a name of only digits, dots and brackets is read as addresses, not looked up.

    Each dot ends a byte (values wrap at 256); bytes are taken four at a time and a short tail is
    dropped, so b"1.2.3" gives []. None when the name needs a real lookup. The same parse reads
    tcpserver's and tcpclient's host argument.
    """
    octets: list[int] = []
    code = 0
    for byte in name + b".":
        if byte in b"[]":
            continue
        if byte == 0x2E:
            octets.append(code)
            code = 0
        elif 0x30 <= byte <= 0x39:
            code = (code * 10 + byte - 0x30) & 0xFF
        else:
            return None
    whole = len(octets) - len(octets) % 4
    return [".".join(map(str, octets[i : i + 4])) for i in range(0, whole, 4)]
