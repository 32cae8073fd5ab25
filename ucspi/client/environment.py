"""The program's exec, as djb's pathexec_run finds and runs it (the environment: ucspi/environ.py).

Not ucspi/server/spawn.py's posix_spawn: importing it would bring in ctypes and asyncio, tens of
milliseconds for a command that scripts run in loops.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

# Unset PATH: pathexec_run's default.
DEFAULT_PATH = b"/bin:/usr/bin"


def _candidates(program: bytes, search_path: bytes | None) -> list[bytes]:
    if b"/" in program:
        return [program]
    path = DEFAULT_PATH if search_path is None else search_path
    # An empty element is the current directory.
    return [(directory or b".") + b"/" + program for directory in path.split(b":")]


def _as_mapping(entries: Sequence[bytes]) -> dict[bytes, bytes] | None:
    """The entries as os.execve's mapping, when it can carry them exactly (in order, no duplicates)."""
    mapping: dict[bytes, bytes] = {}
    for entry in entries:
        name, equals, value = entry.partition(b"=")
        if not equals or not name or name in mapping:
            return None
        mapping[name] = value
    return mapping


def _raw_execve(path: bytes, argv: Sequence[bytes], entries: Sequence[bytes]) -> int:
    """execve through libc with the entries as they are; returns the errno when it fails."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    c_envp = (ctypes.c_char_p * (len(entries) + 1))(*entries, None)
    libc.execve(path, c_argv, c_envp)
    return ctypes.get_errno()


def exec_program(argv: Sequence[bytes], entries: Sequence[bytes], search_path: bytes | None) -> int:
    """pathexec_run: try each PATH directory; returns the errno to report when every one failed.

    ENOENT goes on to the next directory; EACCES, EPERM and EISDIR are remembered and go on;
    any other error stops the search. No /bin/sh fallback for ENOEXEC, as in the original.
    """
    mapping = _as_mapping(entries) if argv[0] else None
    saved_error = 0
    for candidate in _candidates(argv[0], search_path):
        if mapping is not None:
            try:
                os.execve(candidate, list(argv), mapping)
            except OSError as error:
                result = error.errno or 0
        else:
            result = _raw_execve(candidate, argv, entries)
        if result != errno.ENOENT:
            saved_error = result
            if result not in (errno.EPERM, errno.EACCES, errno.EISDIR):
                return result
    return saved_error or errno.ENOENT
