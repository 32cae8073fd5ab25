"""Rules text -> cdb, written to TMP, flushed and renamed over CDB (tcprules, spec 3.2 and 2.5).

Streaming: input is read in blocks and each record goes straight to cdbx's maker, which keeps
only its small C index; no list of lines or records is ever held in Python.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import cdbx

from ucspi.errors import EXIT_PERMANENT, EXIT_TEMPORARY, Fatal, error_text
from ucspi.rules.cidr import CIDR_LENGTHS_KEY
from ucspi.rules.syntax import RuleSyntaxError, add_records

# Whole lines of a block go through one regex findall: big enough to amortise the calls, small
# enough that the block's list of matches stays in the CPU cache (64 KiB measured best, 1 MiB 10% slower).
_READ_SIZE = 1 << 16


class _InputError(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


def _blocks(input_fd: int) -> Iterator[bytes]:
    while True:
        try:
            block = os.read(input_fd, _READ_SIZE)
        except OSError as error:
            raise _InputError(error) from None
        if not block:
            return
        yield block


def _fatal(exit_code: int, *parts: bytes, error: BaseException | None = None) -> Fatal:
    message = b"tcprules: fatal: " + b"".join(parts)
    if error is not None:
        message += b": " + error_text(error).encode()
    return Fatal(message, exit_code)


def compile_rules(input_fd: int, cdb_path: bytes, tmp_path: bytes) -> None:
    """Compile the rules read from input_fd; raise Fatal with the original's message on failure.

    On any failure CDB is untouched and TMP is left behind, as the original leaves it.
    """
    try:
        tmp_fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o644)
    except OSError as error:
        raise _fatal(EXIT_TEMPORARY, b"unable to create ", tmp_path, error=error) from None
    try:
        # Given a descriptor, cdbx never deletes the file: a failed run leaves TMP as tcprules does.
        maker = cdbx.CDB.make(tmp_fd, close=False, mmap=False)
        lengths = add_records(_blocks(input_fd), maker.add).record_data()
        if lengths is not None:
            maker.add(CIDR_LENGTHS_KEY, lengths)  # only with CIDR rules: 0.88 files stay identical
        maker.commit().close()
        os.fsync(tmp_fd)
        closing_fd, tmp_fd = tmp_fd, -1
        os.close(closing_fd)  # close can report a deferred write error (NFS)
    except RuleSyntaxError as error:
        shown = error.line.split(b"\x00", 1)[0]  # printed as a C string
        raise _fatal(EXIT_PERMANENT, b"unable to parse this line: ", shown) from None
    except _InputError as error:
        raise _fatal(EXIT_TEMPORARY, b"unable to read input", error=error.error) from None
    except OSError as error:
        raise _fatal(EXIT_TEMPORARY, b"unable to write to ", tmp_path, error=error) from None
    finally:
        if tmp_fd >= 0:
            os.close(tmp_fd)
    try:
        os.rename(tmp_path, cdb_path)
    except OSError as error:
        raise _fatal(EXIT_TEMPORARY, b"unable to move ", tmp_path, b" to ", cdb_path, error=error) from None
