"""The CIDR lengths record: which prefix lengths a compiled rules file holds, per family.

A lookup probes one CIDR key per recorded length instead of one per possible length (32 or 128
probes). tcprules writes the record, last, only when the file has CIDR rules, so a 0.88 file
stays byte-identical. Its key holds a NUL (no environment string or client address can be looked
up as it) and a `:` without being an IPv6 address (no rules line compiles to it).

Data: one NUL-terminated chunk per family that has CIDR rules, its marker then the lengths,
longest first, comma-separated: `_24,8\\0^64,32\\0`.
"""

from __future__ import annotations

from collections import namedtuple

from ucspi.address import IPV4_CIDR_MARKER, IPV6_CIDR_MARKER

CIDR_LENGTHS_KEY = b"\x00:cidr-lengths"


class CidrLengths(namedtuple("_CidrLengthFields", "ipv4 ipv6", defaults=((), ()))):
    """Prefix lengths, longest first, for IPv4 and IPv6 CIDR keys (a named tuple: no dataclasses
    import, which would cost tcprulescheck a third of its start)."""

    __slots__ = ()
    ipv4: tuple[int, ...]
    ipv6: tuple[int, ...]

    def __bool__(self) -> bool:
        return bool(self.ipv4 or self.ipv6)


NO_CIDR = CidrLengths()


class CidrLengthsSeen:
    """What a compile collects while it reads: the lengths each family uses."""

    __slots__ = ("ipv4", "ipv6")

    def __init__(self) -> None:
        self.ipv4: set[int] = set()
        self.ipv6: set[int] = set()

    def add(self, packed_length: int, prefix_length: int) -> None:
        (self.ipv4 if packed_length == 4 else self.ipv6).add(prefix_length)

    def record_data(self) -> bytes | None:
        """The data of the record, None when the file has no CIDR rule (no record then)."""
        chunks = [
            marker + b",".join(b"%d" % length for length in sorted(lengths, reverse=True)) + b"\x00"
            for marker, lengths in ((IPV4_CIDR_MARKER, self.ipv4), (IPV6_CIDR_MARKER, self.ipv6))
            if lengths
        ]
        return b"".join(chunks) or None


def decode_cidr_lengths(data: bytes | None) -> CidrLengths:
    """The record's data -> the lengths; what is not a valid length is ignored (a hand-made cdb)."""
    if not data:
        return NO_CIDR
    found: dict[bytes, set[int]] = {IPV4_CIDR_MARKER: set(), IPV6_CIDR_MARKER: set()}
    for chunk in data.split(b"\x00")[:-1]:
        marker = chunk[:1]
        if marker not in found:
            continue
        width = 32 if marker == IPV4_CIDR_MARKER else 128
        for number in chunk[1:].split(b","):
            if number.isdigit() and 1 <= int(number[:4]) <= width and len(number) <= 3:
                found[marker].add(int(number))
    return CidrLengths(
        tuple(sorted(found[IPV4_CIDR_MARKER], reverse=True)), tuple(sorted(found[IPV6_CIDR_MARKER], reverse=True))
    )
