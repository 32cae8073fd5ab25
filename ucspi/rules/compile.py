"""Rules text -> cdb, written to TMP, flushed and renamed over CDB (tcprules, docs/behaviour.md §3.2 and 2.5).

Streaming: input is read in blocks and each record goes straight to cdbx's maker, which keeps
only its small C index; no list of lines or records is ever held in Python.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
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
        except MemoryError:
            raise _InputError(OSError(errno.ENOMEM, "out of memory")) from None  # getln's ENOMEM
        if not block:
            return
        yield block


def _fatal(exit_code: int, *parts: bytes, error: BaseException | int | None = None) -> Fatal:
    message = b"tcprules: fatal: " + b"".join(parts)
    if error is not None:
        message += b": " + error_text(error).encode()
    return Fatal(message, exit_code)


def _open_tmp(tmp_path: bytes) -> int:
    """TMP opened, locked and emptied: the original's open_trunc, safe for runs sharing TMP.

    A second run on the same TMP waits for the first (README, differences item 14). When it gets the
    lock, TMP may name another file, or none, because the first run renamed its own over CDB:
    it opens TMP again rather than truncate what is now someone's cdb. Only then does it
    truncate, as O_TRUNC would have. Every failure is the original's failure to open.
    """
    while True:
        try:
            # O_NONBLOCK: a FIFO without a reader fails at once (ENXIO), as in the original.
            tmp_fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o644)
        except OSError as error:
            raise _fatal(EXIT_TEMPORARY, b"unable to create ", tmp_path, error=error) from None
        try:
            fcntl.flock(tmp_fd, fcntl.LOCK_EX)
            held = os.fstat(tmp_fd)
            try:
                named = os.stat(tmp_path)
            except FileNotFoundError:
                named = None
            if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                if stat.S_ISREG(held.st_mode):
                    os.ftruncate(tmp_fd, 0)  # O_TRUNC leaves FIFOs and devices alone, and so do we
                return tmp_fd
        except OSError as error:
            os.close(tmp_fd)
            raise _fatal(EXIT_TEMPORARY, b"unable to create ", tmp_path, error=error) from None
        os.close(tmp_fd)


# What the original's cdb_make leaves in errno where cdbx raises without one. Past 4 GiB its
# posplus() sets ENOMEM, and so does a failed alloc(): "unable to write to TMP: out of memory".
_CDB_ERRNO: dict[type[BaseException], int] = {OverflowError: errno.ENOMEM, MemoryError: errno.ENOMEM}


def _cdb_write_error(tmp_path: bytes, error: BaseException) -> Fatal:
    """The original's die_write() for an error of the cdb library (or of fsync and close).

    cdbx raises OSError with the errno of a failed lseek, ftruncate, write or fsync; OSError
    without one for "Write Error" (write() claimed more than asked: EIO here); OverflowError
    past 4 GiB ("Key is too long" included); MemoryError when its index cannot grow.
    """
    number = getattr(error, "errno", None) or _CDB_ERRNO.get(type(error), errno.EIO)
    return _fatal(EXIT_TEMPORARY, b"unable to write to ", tmp_path, error=number)


def _maker_failed(maker: cdbx.CDBMaker) -> bool:
    """Whether cdbx itself failed: after an error of its own a maker refuses every record."""
    try:
        maker.add(b"", b"")  # the TMP of a failed run is abandoned: one record more is harmless
    except OSError as error:
        return error.errno is None  # "I/O operation on a closed file"
    except MemoryError:
        return False  # failing now, after another part ran out first
    return False


def _write_cdb(input_fd: int, tmp_fd: int, tmp_path: bytes) -> None:
    """The records read from input_fd as a cdb in tmp_fd, synced to disk; Fatal on failure."""
    maker: cdbx.CDBMaker | None = None
    try:
        # Given a descriptor, cdbx never deletes the file: a failed run leaves TMP as tcprules does.
        maker = cdbx.CDB.make(tmp_fd, close=False, mmap=False)
        lengths = add_records(_blocks(input_fd), maker.add).record_data()
        if lengths is not None:
            maker.add(CIDR_LENGTHS_KEY, lengths)  # only with CIDR rules: 0.88 files stay identical
        finishing, maker = maker, None  # from here on, every error is the library's or the disk's
        finishing.commit().close()
        os.fsync(tmp_fd)
    except RuleSyntaxError as error:
        shown = error.line.split(b"\x00", 1)[0]  # printed as a C string
        raise _fatal(EXIT_PERMANENT, b"unable to parse this line: ", shown) from None
    except _InputError as error:
        raise _fatal(EXIT_TEMPORARY, b"unable to read input", error=error.error) from None
    except MemoryError as error:
        if maker is not None and not _maker_failed(maker):
            raise _fatal(EXIT_TEMPORARY, b"out of memory") from None  # the parser's: die_nomem()
        raise _cdb_write_error(tmp_path, error) from None
    except (OSError, OverflowError) as error:
        raise _cdb_write_error(tmp_path, error) from None


def compile_rules(input_fd: int, cdb_path: bytes, tmp_path: bytes) -> None:
    """Compile the rules read from input_fd; raise Fatal with the original's message on failure.

    On any failure CDB is untouched and TMP is left behind, as the original leaves it. TMP stays
    locked until it has been renamed over CDB, so that a run waiting for it never writes into a
    file that has become CDB.
    """
    tmp_fd = _open_tmp(tmp_path)
    lock_fd = -1
    try:
        _write_cdb(input_fd, tmp_fd, tmp_path)
        try:
            # A second descriptor of the same open file keeps the lock while the close reports
            # its errors: close can report a deferred write error (NFS).
            lock_fd = os.dup(tmp_fd)
            closing_fd, tmp_fd = tmp_fd, -1
            os.close(closing_fd)
        except OSError as error:
            raise _cdb_write_error(tmp_path, error) from None
        try:
            os.rename(tmp_path, cdb_path)
        except OSError as error:
            raise _fatal(EXIT_TEMPORARY, b"unable to move ", tmp_path, b" to ", cdb_path, error=error) from None
    finally:
        for fd in (tmp_fd, lock_fd):
            if fd >= 0:
                os.close(fd)
