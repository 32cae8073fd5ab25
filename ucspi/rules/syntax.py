"""One line of rules text -> the keys and the cdb data it stands for (docs/behaviour.md §3.2-3.4).

Everything is bytes: a rules file is not text, and the original keeps every byte verbatim.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from ucspi.address import (
    CidrError,
    cidr_key,
    format_ipv4,
    format_ipv6,
    is_v4_mapped,
    normalise_ipv6_prefix,
    parse_cidr,
    parse_ipv6,
)
from ucspi.numbers import leading_digits, scan_ulong
from ucspi.rules.cidr import CidrLengthsSeen

DENY_MARKER = b"D\x00"


class RuleSyntaxError(Exception):
    """A line the original rejects with `unable to parse this line`."""

    def __init__(self, line: bytes) -> None:
        super().__init__(line)
        self.line = line


def instruction_data(instruction: bytes, line: bytes) -> bytes:
    """`allow|deny[,NAME=dVALUEd...]` -> the record data: `D\\0`, then `+NAME=VALUE\\0` each."""
    if instruction.startswith(b"deny"):
        parts = [DENY_MARKER]
        position = 4
    elif instruction.startswith(b"allow"):
        parts = []
        position = 5
    else:
        raise RuleSyntaxError(line)
    end = len(instruction)
    while position < end:
        if instruction[position] != 0x2C:  # ","
            raise RuleSyntaxError(line)
        # The name runs to the next "=" anywhere on the line, commas included (docs/behaviour.md §9.5).
        equals = instruction.find(b"=", position)
        if equals < 0 or equals + 1 >= end:
            raise RuleSyntaxError(line)
        delimiter = instruction[equals + 1 : equals + 2]
        closing = instruction.find(delimiter, equals + 2)
        if closing < 0:
            raise RuleSyntaxError(line)
        parts.append(b"+" + instruction[position + 1 : equals + 1] + instruction[equals + 2 : closing] + b"\x00")
        position = closing + 1
    return b"".join(parts)


def _scan_number(text: bytes, line: bytes) -> int:
    """djb's scan_ulong on a C string: digits up to a NUL, wrapping at 64 bits."""
    text = text.split(b"\x00", 1)[0]
    if leading_digits(text) != len(text):
        raise RuleSyntaxError(line)
    return scan_ulong(text)


def address_keys(address: bytes, line: bytes) -> list[bytes]:
    """The key(s) for an address: itself, or the expansion of its first range (docs/behaviour.md §3.4)."""
    dash = address.find(b"-")
    if dash < 0 or b"=" in address or b"@" in address:
        return [address]
    left = address.rfind(b".", 0, dash) + 1
    right = address.find(b".", dash + 1)
    if right < 0:
        right = len(address)
    bottom = _scan_number(address[left:dash], line)
    top = min(_scan_number(address[dash + 1 : right], line), 255)
    prefix, suffix = address[:left], address[right:]
    return [b"%s%d%s" % (prefix, number, suffix) for number in range(bottom, top + 1)]


# README, differences item 5: the instruction starts after the first ":" followed by allow or deny and
# then "," or the end of the (stripped) line. Linear: no line can make it backtrack for long.
_SEPARATOR = re.compile(rb":(?:allow|deny)(?:,|\Z)")


def ipv6_key(text: bytes) -> bytes | None:
    """An exact IPv6 address in any spelling -> the text TCPREMOTEIP shows for it (RFC 5952), a
    v4-mapped one -> its dotted quad (the lookup's form for it); a colon-terminated prefix ->
    its groups as tcpserver prints them; None if text is neither."""
    packed = parse_ipv6(text)
    if packed is None:
        return normalise_ipv6_prefix(text)
    return format_ipv4(packed[12:]) if is_v4_mapped(packed) else format_ipv6(packed)


def extended_address_keys(address: bytes, line: bytes, cidr: CidrLengthsSeen) -> list[bytes]:
    """The key(s) for an address holding a ":" or a "/" (README, differences item 5).

    Host forms and a "/" only in the INFO of INFO@IP keep 0.88's reading; otherwise the address
    must be an IPv6 address or prefix (INFO@ allowed) or a CIDR network, else it is the
    original's parse error.
    """
    if b"=" in address:
        if b":" in address:
            raise RuleSyntaxError(line)  # no host name holds a ":"
        return address_keys(address, line)
    info, at, ip = address.rpartition(b"@")
    if b"/" in ip:
        if at:
            raise RuleSyntaxError(line)  # INFO@ with CIDR: the lookup never tries such a key
        try:
            packed, length = parse_cidr(ip)
        except CidrError:
            raise RuleSyntaxError(line) from None
        if is_v4_mapped(packed) and length > 96:
            packed, length = packed[12:], length - 96  # v4-mapped clients are looked up as IPv4
        cidr.add(len(packed), length)
        return [cidr_key(packed, length)]
    if b":" in ip:
        key = ipv6_key(ip)
        if key is None:
            raise RuleSyntaxError(line)
        return [info + at + key]
    if b":" in address:
        raise RuleSyntaxError(line)  # a ":" only in INFO: not an IPv6 rule
    return address_keys(address, line)


# Big rule files repeat a handful of instructions (`allow,RELAYCLIENT=""`): parse each once.
_INSTRUCTION_CACHE_LIMIT = 4096

# The fast path: one findall over a block of whole lines does, in C, what a per-line loop costs
# most for in Python. Each match is one line and its "\n"; comment and blank lines before it
# are swallowed. The common shape, an address that is its own key (no range: no "-", or a host
# name "=...") then the first ":", gives (address, ":instruction", b""); any other line (a "-"
# or "/" in the address, no colon, a comment or blank line at the very end of the block) gives
# (b"", b"", line) for the general path; so does a fast-path line whose instruction is not yet
# cached (it may be IPv6: `2001:db8::1:allow`). The instruction keeps its trailing blanks: the cache
# is keyed by it raw.
_LINE = re.compile(rb"(?:(?:#[^\n]*)?\n)*(?:(=[^\n:]*|[^#\n:\-/][^\n:\-/]*|)(:[^\n]*)|([^\n]*))\n")

AddRecord = Callable[[bytes, bytes], object]


def _whole_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Blocks of any size -> runs of whole lines, each ending in "\\n" (a last line gets one)."""
    pending: list[bytes] = []  # a line still without its end; a list, so a huge line is not quadratic
    for block in blocks:
        end = block.rfind(b"\n") + 1
        if not end:
            if block:
                pending.append(block)
            continue
        if pending:
            pending.append(block[:end])
            yield b"".join(pending)
            pending.clear()
        else:
            yield block[:end] if end < len(block) else block
        if end < len(block):
            pending.append(block[end:])
    if pending:
        pending.append(b"\n")  # a final line without "\n" is still a line (docs/behaviour.md §3.2)
        yield b"".join(pending)


def _cached_data(known: dict[bytes, bytes], instruction: bytes, line: bytes) -> bytes:
    """The data of a ":instruction" (trailing blanks allowed) not yet in known; cached."""
    data = instruction_data(instruction[1:].rstrip(b" \t"), line)
    if len(known) >= _INSTRUCTION_CACHE_LIMIT:
        known.clear()
    known[instruction] = data
    return data


def _add_line(line: bytes, add: AddRecord, known: dict[bytes, bytes], cidr: CidrLengthsSeen) -> None:
    """The general path, for one raw line without its "\\n" (docs/behaviour.md §3.2 step 2)."""
    if not line or line[0] == 0x23:  # blank, or "#" in column 1 only (docs/behaviour.md §9.4)
        return
    # Trailing spaces and tabs go; a CR stays and ends up in the key or data.
    line = line.rstrip(b" \t")
    separator = _SEPARATOR.search(line)
    # Without such a colon, the original's first colon, and its parse error if there is one.
    colon = separator.start() if separator is not None else line.find(b":")
    if colon < 0:
        return  # no colon: silently skipped, not an error
    instruction = line[colon:]
    data = known.get(instruction)
    if data is None:
        data = _cached_data(known, instruction, line)
    address = line[:colon]
    if b":" in address or b"/" in address:
        keys = extended_address_keys(address, line, cidr)
    else:
        keys = address_keys(address, line)
    for key in keys:
        add(key, data)


def _add_lines(text: bytes, add: AddRecord, known: dict[bytes, bytes], cidr: CidrLengthsSeen) -> None:
    """Every record of text, whole lines ending in "\\n", through add, in file order."""
    for address, instruction, line in _LINE.findall(text):
        try:
            data = known[instruction]
        except KeyError:
            if not instruction:
                _add_line(line, add, known, cidr)
                continue
            stripped = (address + instruction).rstrip(b" \t")
            if _SEPARATOR.match(stripped, len(address)) is None:
                _add_line(stripped, add, known, cidr)  # a later colon may be the separator
                continue
            # The first colon is the separator: cache the data under the raw instruction.
            data = _cached_data(known, instruction, stripped)
        add(address, data)


def add_records(blocks: Iterable[bytes], add: AddRecord) -> CidrLengthsSeen:
    """Rules text, given in blocks of any size -> add(key, data) for every record, in file order.

    Returns the CIDR prefix lengths the rules used (for the lengths record, rules/cidr.py).
    Raises RuleSyntaxError at the first bad line, as tcprules stops there (docs/behaviour.md §3.2); the records
    before it have been added.
    """
    known: dict[bytes, bytes] = {}
    cidr = CidrLengthsSeen()
    for text in _whole_lines(blocks):
        _add_lines(text, add, known, cidr)
    return cidr


def rule_records(blocks: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Rules text, given in blocks of any size -> (key, data) for every record, in file order.

    Raises RuleSyntaxError at the first bad line, after yielding the records before it. The CIDR
    lengths record is not among them: compile_rules adds it.
    """
    known: dict[bytes, bytes] = {}
    cidr = CidrLengthsSeen()
    records: list[tuple[bytes, bytes]] = []

    def collect(key: bytes, data: bytes) -> None:
        records.append((key, data))

    for text in _whole_lines(blocks):
        try:
            _add_lines(text, collect, known, cidr)
        except RuleSyntaxError:
            yield from records
            raise
        yield from records
        records.clear()
