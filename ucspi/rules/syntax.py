"""One line of rules text -> the keys and the cdb data it stands for (spec 3.2-3.4).

Everything is bytes: a rules file is not text, and the original keeps every byte verbatim.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

DENY_MARKER = b"D\x00"
_U64 = 1 << 64


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
        # The name runs to the next "=" anywhere on the line, commas included (spec 9.5).
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
    if text and not text.isdigit():
        raise RuleSyntaxError(line)
    # bytes.isdigit() is ASCII-only, so this is exactly the original's 0-9 test.
    return int(text) % _U64 if text else 0


def address_keys(address: bytes, line: bytes) -> list[bytes]:
    """The key(s) for an address: itself, or the expansion of its first range (spec 3.4)."""
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


# Big rule files repeat a handful of instructions (`allow,RELAYCLIENT=""`): parse each once.
_INSTRUCTION_CACHE_LIMIT = 4096


def rule_records(blocks: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Rules text, given in blocks of any size -> (key, data) for every record, in file order.

    Raises RuleSyntaxError at the first bad line, as tcprules stops there (spec 3.2).
    """
    known: dict[bytes, bytes] = {}
    pending = b""
    for block in itertools.chain(blocks, (b"",)):
        lines = (pending + block).split(b"\n")
        pending = lines.pop() if block else b""
        for line in lines:
            if not line or line[0] == 0x23:  # blank, or "#" in column 1 only (spec 9.4)
                continue
            # Trailing spaces and tabs go; a CR stays and ends up in the key or data.
            line = line.rstrip(b" \t")
            colon = line.find(b":")
            if colon < 0:
                continue  # no colon: silently skipped, not an error
            instruction = line[colon + 1 :]
            data = known.get(instruction)
            if data is None:
                data = instruction_data(instruction, line)
                if len(known) >= _INSTRUCTION_CACHE_LIMIT:
                    known.clear()
                known[instruction] = data
            address = line[:colon]
            if b"-" in address:
                for key in address_keys(address, line):
                    yield key, data
            else:
                yield address, data
