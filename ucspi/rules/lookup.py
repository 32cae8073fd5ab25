"""Peer facts -> the rule that applies (spec 5). The one lookup for tcpserver and tcprulescheck."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

# A cdb reader's get(): the first record's data for a key, or None.
RecordGetter = Callable[[bytes], "bytes | None"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The matching rule: its key and raw record data; key None means no rule matched."""

    key: bytes | None
    data: bytes = b""

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


def candidate_keys(ip: bytes, host: bytes | None, info: bytes | None) -> Iterator[bytes]:
    """The keys to try, in the original's order; host and info None when unset (not empty)."""
    if info is not None:
        yield info + b"@" + ip
        if host is not None:
            yield info + b"@=" + host
    yield ip
    if host is not None:
        yield b"=" + host
    # Every prefix of the IP that ends in a dot, longest first (any string, not only IPs).
    for length in range(len(ip), 0, -1):
        if ip[length - 1] == 0x2E:
            yield ip[:length]
    if host is not None:
        for position in range(len(host)):
            if host[position] == 0x2E:
                yield b"=" + host[position:]
        yield b"="
    yield b""


def find_rule(get: RecordGetter, ip: bytes, host: bytes | None, info: bytes | None) -> Decision:
    """The first candidate key present in the rules; cdb errors (OSError) propagate."""
    for key in candidate_keys(ip, host, info):
        data = get(key)
        if data is not None:
            return Decision(key, data)
    return NO_RULE


def describe(decision: Decision) -> bytes:
    """tcprulescheck's report: the matching key, the variables, then allow or deny (spec 4)."""
    if decision.key is None:
        return b"default:\nallow connection\n"
    lines = [b"rule " + decision.key + b":\n"]
    for chunk in decision.chunks():
        if chunk[:1] == b"D":
            lines.append(b"deny connection\n")  # the original stops at the deny marker
            return b"".join(lines)
        if chunk[:1] == b"+":
            lines.append(b"set environment variable " + chunk[1:] + b"\n")
    lines.append(b"allow connection\n")
    return b"".join(lines)
