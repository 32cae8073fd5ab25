"""Rules files for `make fuzz`, from a seeded random.Random: fast enough for a million inputs.

The same grammar and byte tokens as tests/conftest.py's hypothesis strategies (whose tables this
reuses), drawn with plain `random` because hypothesis costs about a millisecond per example.
Kinds: grammar files (valid and invalid lines), raw bytes, CRLF files, mutated grammar files,
files with one very long line, IPv6 and CIDR lines; plus a fixed table of every range edge.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from conftest import (
    _BAD_INSTRUCTIONS,
    _BAD_NUMBERS,
    _COLON_ADDRESSES,
    _NAMES,
    _NUMBER_EDGES,
    _RAW_TOKENS,
)

Generator = Callable[[random.Random], bytes]

_HOST_LABELS = [b"Example", b"COM", b"a\xe9b", b"a-b", b"", b"mail", b"x_1", b"0"]
_USERS = [b"", b"joe", b"Joe", b"a b", b"x.y-z", b"\xff"]
_VERBATIM = [b" ", b"\t", b"\r", b"\x00", b"\xff", b"\x80", b"#", b".", b",", b"=", b"@", b"a", b"1", b"-", b"/"]
_DELIMITERS = [b'"', b"/", b"+", b"=", b",", b":", b" ", b"x", b"\x00", b"\r", b"\xff"]
_VALUES = [b"", b"movie.edu", b"a,b=c:d", b"  spaced  ", b"\xc3\x28", b"\xed\xa0\x80"]  # invalid UTF-8 too
_BLANKS = [b"", b"", b"", b" ", b"\t", b" \t  "]
_EDITS = [bytes([byte]) for byte in b'\x00\r\n:-.=,"\xff\xc3\x80 \t#@/']
# Around the read sizes of ours (64 KiB blocks) and of the original (djb's buffers: 1, 4, 8 KiB).
_LONG_LENGTHS = [1023, 1024, 1025, 4095, 4096, 4097, 8191, 8192, 8193, 65535, 65536, 65537, 131072, 200_000]
_CIDR_LENGTHS = [*b"0 1 7 8 16 24 31 32 33 48 64 96 127 128 129 08 -1 18446744073709551624".split(), b"", b" 8", b"8 "]


def _octet(r: random.Random) -> bytes:
    return b"%d" % r.randrange(256) if r.random() < 0.6 else r.choice(_NUMBER_EDGES)


def _ip(r: random.Random) -> bytes:
    return b".".join(_octet(r) for _ in range(r.randint(1, 5)))


def _range_number(r: random.Random, valid_only: bool) -> bytes:
    roll = r.random()
    if roll < 0.1:
        return b""
    if not valid_only and roll > 0.85:
        return r.choice(_BAD_NUMBERS)
    return _octet(r)


def _range(r: random.Random, valid_only: bool) -> bytes:
    before = b"".join(_octet(r) + b"." for _ in range(r.randint(0, 3)))
    tail = b"".join(
        b"." + (_octet(r) if r.random() < 0.7 else _octet(r) + b"-" + _octet(r)) for _ in range(r.randint(0, 3))
    )
    middle = _range_number(r, valid_only) + b"-" + _range_number(r, valid_only)
    return before + middle + tail + (b"." if r.random() < 0.3 else b"")


def _host(r: random.Random) -> bytes:
    labels = []
    for _ in range(r.randint(1, 4)):
        if r.random() < 0.6:
            labels.append(bytes(r.choice(b"abcxyz0129-_") for _ in range(r.randint(0, 6))))
        else:
            labels.append(r.choice(_HOST_LABELS))
    return b".".join(labels)


def _ipv6(r: random.Random) -> bytes:
    """An IPv6 address in some spelling: compressed or not, odd case, leading zeros, a v4 tail."""
    groups = [b"%x" % r.choice([0, 0, 1, 0xDB8, 0x2001, 0xFFFF, r.randrange(0x10000)]) for _ in range(8)]
    roll = r.random()
    if roll < 0.2:
        groups = [group.upper().zfill(r.choice([1, 4])) for group in groups]
    if roll > 0.8:
        text = b"::ffff:" + b".".join(b"%d" % r.randrange(256) for _ in range(4))
    elif r.random() < 0.6:
        start = r.randrange(8)
        end = r.randint(start, 8)
        text = b":".join(groups[:start]) + b"::" + b":".join(groups[end:])
    else:
        text = b":".join(groups)
    return text


def _extended_address(r: random.Random) -> bytes:
    """Differences.md 5: IPv6 addresses and prefixes, CIDR networks (valid or not)."""
    roll = r.random()
    if roll < 0.3:
        return _ipv6(r)
    if roll < 0.4:
        return r.choice(_USERS) + b"@" + _ipv6(r)
    if roll < 0.5:
        return b":".join(b"%x" % r.randrange(0x10000) for _ in range(r.randint(1, 7))) + b":"
    if roll < 0.75:
        return _ip(r) + r.choice([b"", b"."]) + b"/" + r.choice(_CIDR_LENGTHS)
    if roll < 0.9:
        return _ipv6(r) + b"/" + r.choice(_CIDR_LENGTHS)
    return r.choice(_COLON_ADDRESSES)


def _verbatim(r: random.Random, valid_only: bool) -> bytes:
    alphabet = _VERBATIM[:-2] if valid_only else _VERBATIM
    return b"".join(r.choice(alphabet) for _ in range(r.randint(0, 8)))


def address(r: random.Random, valid_only: bool = False) -> bytes:
    """The address part of a rule: every form of docs/behaviour.md §3.3, ranges, odd verbatim keys."""
    roll = r.randrange(16)
    if roll == 0:
        return _ip(r)
    if roll == 1:
        return _ip(r) + b"."
    if roll in (2, 3):
        return _range(r, valid_only)
    if roll == 4:
        return r.choice([b"", b"="])
    if roll == 5:
        return b"=" + _host(r)
    if roll == 6:
        return b"=." + _host(r)
    if roll == 7:
        return r.choice(_USERS) + b"@" + (_ip(r) if r.random() < 0.7 else _range(r, True))
    if roll == 8:
        return r.choice(_USERS) + b"@=" + _host(r)
    if roll == 9:
        return r.choice([b" ", b"  ", b"\t"]) + _ip(r)
    if roll in (10, 11):
        return _verbatim(r, valid_only)
    if roll == 12:
        return b"=" + _host(r) + b"/x"  # a '/' in a host form: 0.88's reading
    if roll == 13:
        return r.choice(_USERS) + b"/@" + _ip(r)  # a '/' in INFO: 0.88's reading
    if valid_only:
        return _ip(r)
    return _extended_address(r)


def _random_bytes(r: random.Random, most: int) -> bytes:
    return r.randbytes(r.randint(0, most))


def _variable(r: random.Random, last: bool) -> bytes:
    """`,NAME=dVALUEd`: the name stops at the first '=', d is any byte but newline (docs/behaviour.md §3.2)."""
    name = r.choice(_NAMES) if r.random() < 0.7 else _random_bytes(r, 6)
    name = name.replace(b"=", b"").replace(b"\n", b"")
    delimiter = r.choice(_DELIMITERS) if r.random() < 0.7 else bytes([r.randrange(256)])
    if delimiter == b"\n" or (last and delimiter in (b" ", b"\t")):
        delimiter = b'"'  # tcprules strips a closing blank at the end of the line
    value = r.choice(_VALUES) if r.random() < 0.5 else _random_bytes(r, 8)
    value = value.replace(delimiter, b"").replace(b"\n", b"")
    return b"," + name + b"=" + delimiter + value + delimiter


def instruction(r: random.Random, valid_only: bool = False) -> bytes:
    if not valid_only and r.random() < 0.12:
        return r.choice(_BAD_INSTRUCTIONS)
    count = r.choice([0, 0, 1, 1, 2, 3])
    text = r.choice([b"allow", b"deny"])
    return text + b"".join(_variable(r, index == count - 1) for index in range(count))


def _other_line(r: random.Random) -> bytes:
    """Lines tcprules skips: comments, blank and whitespace-only lines, lines without a colon."""
    roll = r.randrange(3)
    if roll == 0:
        return b"#" + _random_bytes(r, 12).replace(b"\n", b"")
    if roll == 1:
        return r.choice([b"", b" ", b"\t", b" \t ", b"\r"])
    return _random_bytes(r, 12).replace(b"\n", b"").replace(b":", b"")


def rule_line(r: random.Random, valid_only: bool = False) -> bytes:
    if r.random() < 0.2:
        return _other_line(r)
    return address(r, valid_only) + b":" + instruction(r, valid_only) + r.choice(_BLANKS)


def _join(r: random.Random, lines: list[bytes], newline: bytes = b"\n") -> bytes:
    # A final line without a newline is still a line (docs/behaviour.md §3.2).
    return newline.join(lines) + (newline if lines and r.random() < 0.7 else b"")


def grammar_file(r: random.Random) -> bytes:
    valid_only = r.random() < 0.3
    count = r.randint(0, 8) if r.random() < 0.9 else r.randint(9, 60)
    return _join(r, [rule_line(r, valid_only) for _ in range(count)])


def crlf_file(r: random.Random) -> bytes:
    """A file written on another system: every or some lines end in CR LF."""
    lines = [rule_line(r, r.random() < 0.5) for _ in range(r.randint(1, 6))]
    if r.random() < 0.5:
        return _join(r, lines, b"\r\n")
    return _join(r, [line + b"\r" if r.random() < 0.5 else line for line in lines])


def raw_file(r: random.Random) -> bytes:
    """Raw bytes biased toward the syntax's characters; some lines get an `:allow`/`:deny`."""

    def raw() -> bytes:
        return b"".join(
            r.choice(_RAW_TOKENS) if r.random() < 0.7 else bytes([r.randrange(256)]) for _ in range(r.randint(0, 12))
        )

    if r.random() < 0.3:
        return raw()
    lines = []
    for _ in range(r.randint(0, 6)):
        lines.append(raw() + r.choice([b":allow", b":deny"]) + raw() if r.random() < 0.5 else raw())
    return b"\n".join(lines)


def mutated_file(r: random.Random) -> bytes:
    """A grammar file with a few bytes inserted, deleted, replaced or a slice repeated."""
    text = bytearray(grammar_file(r))
    for _ in range(r.randint(1, 4)):
        position = r.randint(0, len(text))
        roll = r.randrange(4)
        if roll == 0 or not text:
            text[position:position] = r.choice(_EDITS) if r.random() < 0.8 else bytes([r.randrange(256)])
        elif roll == 1:
            del text[position : position + r.randint(1, 3)]
        elif roll == 2:
            text[position : position + 1] = r.choice(_EDITS)
        else:
            text[position:position] = text[position : position + r.randint(1, 20)]
    return bytes(text)


def long_line_file(r: random.Random, largest: int = 1 << 20) -> bytes:
    """One line of a length around a read-buffer size (rarely a megabyte), amid ordinary lines."""
    length = r.choice([*_LONG_LENGTHS, largest]) if r.random() < 0.05 else r.choice(_LONG_LENGTHS)
    length += r.randint(-2, 2)
    filler = r.choice([b"v", b"1.", b"\x00", b"\r", b"\xff", b" "]) * length
    filler = filler[:length]
    roll = r.randrange(6)
    if roll == 0:
        line = b":allow,LONG=|" + filler.replace(b"|", b"") + b"|"  # a long value
    elif roll == 1:
        line = filler.replace(b":", b"") + b":deny"  # a long key
    elif roll == 2:
        line = b"#" + filler  # a long comment
    elif roll == 3:
        line = filler.replace(b":", b"")  # a long line without a colon: skipped
    elif roll == 4:
        line = b"1.2.3.4:allow," + filler  # a long bad line: all of it in the message
    else:
        line = b"1.2.3.0-" + b"9" * length + b":allow"  # a huge range top
    before = [rule_line(r, True) for _ in range(r.randint(0, 3))]
    after = [rule_line(r) for _ in range(r.randint(0, 3))]
    return _join(r, [*before, line, *after])


def extended_file(r: random.Random) -> bytes:
    """IPv6 and CIDR lines amid 0.88 ones (in-process only: the original is no reference for them)."""
    lines = []
    for _ in range(r.randint(1, 8)):
        if r.random() < 0.6:
            lines.append(_extended_address(r) + b":" + instruction(r, r.random() < 0.7) + r.choice(_BLANKS))
        else:
            lines.append(rule_line(r))
    return _join(r, lines)


# Weights: the cheap kinds most, long lines rarely (a megabyte line costs milliseconds).
KINDS: dict[str, tuple[Generator, int]] = {
    "grammar": (grammar_file, 40),
    "raw": (raw_file, 25),
    "mutated": (mutated_file, 15),
    "crlf": (crlf_file, 8),
    "extended": (extended_file, 10),
    "long-line": (long_line_file, 2),
}


def generated(r: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    """count (kind, text) pairs drawn by weight."""
    names = list(KINDS)
    weights = [KINDS[name][1] for name in names]
    for name in r.choices(names, weights, k=count):
        yield name, KINDS[name][0](r)


def range_edges() -> list[bytes]:
    """Every pair of range numbers (edges, empty, bad ones), in each place a range can stand."""
    numbers = [b"", *_NUMBER_EDGES, *_BAD_NUMBERS]
    shapes = [b"%s-%s", b"1.2.3.%s-%s", b"10.%s-%s.", b"1.%s-%s.3.4", b"%s-%s.5-6", b"joe@1.2.3.%s-%s"]
    return [
        shape % (bottom, top) + (b":allow\n" if index % 2 else b':deny,X="y"\n')
        for index, shape in enumerate(shapes)
        for bottom in numbers
        for top in numbers
    ]
