"""The environment block a command was exec'd with, read as getenv and pathexec see it.

Shared by tcpserver and tcpclient, and light on imports: tcpclient starts in scripts' loops.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def read_initial_environment() -> list[bytes]:
    """The environment exactly as the command was started with it.

    os.environ cannot give that back: Python adds LC_CTYPE under the C locale (PEP 538), merges
    duplicate names and drops entries without `=`. The kernel's copy of the exec'd block can.
    """
    try:
        with open("/proc/self/environ", "rb") as environ_file:
            block = environ_file.read()
    except OSError:
        return [name + b"=" + value for name, value in os.environb.items()]
    return block.split(b"\x00")[:-1] if block else []


def first_values(entries: Sequence[bytes]) -> dict[bytes, bytes]:
    """NAME -> VALUE as getenv sees the entries: the first of a name wins, entries without `=` don't count."""
    values: dict[bytes, bytes] = {}
    for entry in entries:
        name, equals, value = entry.partition(b"=")
        if equals:
            values.setdefault(name, value)
    return values


def pathexec_changes(initial: Sequence[bytes], changes: Sequence[tuple[bytes, bytes | None]]) -> list[bytes]:
    """pathexec_env, as written: each change removes the first NAME= entry (the last entry takes
    its place), then appends NAME=VALUE unless the value is None. One scan per change."""
    entries = list(initial)
    for name, value in changes:
        prefix = name + b"="
        for position, entry in enumerate(entries):
            if entry.startswith(prefix):
                last = entries.pop()
                if position < len(entries):
                    entries[position] = last
                break
        if value is not None:
            entries.append(prefix + value)
    return entries
