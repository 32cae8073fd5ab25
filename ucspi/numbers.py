"""djb's scan_ulong, the one number scan of every command (docs/behaviour.md §6.1, 3.4): pure, no I/O."""

from __future__ import annotations

import re

_U64 = 1 << 64
# 2**64 has 20 digits: 19 digits always make a small int().
_SAFE_DIGITS = 19
# [0-9], not \d: str's \d (and isdigit()) take other scripts' digits too; djb's test is ASCII.
_LEADING_DIGITS_TEXT = re.compile("[0-9]*")
_LEADING_DIGITS_BYTES = re.compile(b"[0-9]*")


def leading_digits(text: str | bytes) -> int:
    """How many ASCII decimal digits text starts with."""
    if isinstance(text, bytes):
        return _LEADING_DIGITS_BYTES.match(text).end()  # type: ignore[union-attr]
    return _LEADING_DIGITS_TEXT.match(text).end()  # type: ignore[union-attr]


def scan_ulong(text: str | bytes) -> int:
    """The leading decimal digits (none -> 0), wrapping at 2**64 whatever their count."""
    digits = text[: leading_digits(text)]
    if len(digits) <= _SAFE_DIGITS:
        return int(digits) if digits else 0
    # int() refuses over 4,300 digits (and is quadratic): fold 19 digits at a time, mod 2**64.
    number = 0
    for start in range(0, len(digits), _SAFE_DIGITS):
        chunk = digits[start : start + _SAFE_DIGITS]
        number = (number * 10 ** len(chunk) + int(chunk)) % _U64
    return number
