"""The compiled rules file as readers use it: a cdb looked up with the shared order (docs/behaviour.md §5).

The original reopens the cdb for every connection. RulesFile keeps it and reopens it when a
stat shows another file or a changed one (inode, size, mtime, ctime: tcprules renames a new file
in, chmod changes ctime), so every change is seen at the next lookup, as the original sees it.

One process serves every client, so nothing here may block on what the file's owner controls:
- It is opened O_NONBLOCK (a FIFO's open never waits for a writer), and only a regular file is
  read: a FIFO, device or socket is `invalid argument` as the original reports them (a socket's
  open already fails with ENXIO), a directory `is a directory`.
- The live file is never mapped: one truncated in place under a mapping would kill the server
  with SIGBUS. A file up to PRIVATE_COPY_LIMIT is copied into a private memory file, which is
  mapped (a lookup then makes no system call); a bigger one is read with pread at each lookup,
  so that a change costs the loop an open and a header read, whatever the file's size.
- A bigger file whose header names a hash table of more than PREAD_TABLE_SLOTS slots is copied
  too: a lookup may probe a whole table, and a damaged file whose tables are full would cost
  a pread per slot (about 30 s per client for 60 MB, on the loop: cdbx holds the GIL), where the
  mapped copy scans it in milliseconds, as the original's mmap does. A valid cdb of a million
  rules has tables of about 8,000 slots.
- Nothing past the size fstat gave is read, so /dev/zero or a growing file cannot fill memory.
- A file that could not be opened or read is not tried again while its identity is unchanged, for
  FAILURE_MEMORY seconds: the same error is reported meanwhile.

What a lookup found is kept with the opened file (verdict): the same client facts against the
same file give the same rule, so a client seen before costs the stat and a dict lookup. The
memory goes with the file, at the first change a stat sees, and is bounded (VERDICTS_KEPT).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time

import cdbx

from ucspi.rules.cidr import NO_CIDR, CidrLengths
from ucspi.rules.lookup import Decision, find_rule, read_cidr_lengths

# Copying 2 MiB into a memory file takes 0.6-0.9 ms (bench/stress_rulesfile.py measures it).
PRIVATE_COPY_LIMIT = 2 << 20
FAILURE_MEMORY = 1.0
PREAD_TABLE_SLOTS = 1 << 16
_COPY_CHUNK = 256 << 10
# Errors that say nothing about the file (the server is short of descriptors or memory): the
# next client tries again.
_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})

Identity = tuple[int, int, int, int, int]
# (the rule, whether it denies, its variables in rule order): what a server needs of a rule.
Verdict = tuple[Decision, bool, tuple[tuple[bytes, bytes], ...]]
# Verdicts kept per opened file: a flood of new addresses clears them, it cannot grow them.
VERDICTS_KEPT = 4096


def _identity(status: os.stat_result) -> Identity:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def _open_regular(path: bytes) -> tuple[int, os.stat_result]:
    """Our own descriptor (close-on-exec: no child inherits it) of a regular file, and its fstat."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    except BaseException:
        os.close(fd)
        raise
    return fd, status


def _private_copy(fd: int, size: int) -> cdbx.CDB | None:
    """The file's first `size` bytes in a memory file of our own, mapped; None where no memory
    file can be had. The descriptor given stays open."""
    try:
        memory_fd = os.memfd_create("ucspi-rules", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return None
    try:
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(_COPY_CHUNK, size - offset), offset)
            if not chunk:
                break  # truncated meanwhile: the next stat sees it
            try:
                os.write(memory_fd, chunk)
            except OSError:  # no room for a copy (ENOSPC, EFBIG under RLIMIT_FSIZE): read the file
                os.close(memory_fd)
                return None
            offset += len(chunk)
        return cdbx.CDB(memory_fd, close=True, mmap=None)
    except BaseException:
        os.close(memory_fd)
        raise


def _longest_table(fd: int) -> int:
    """The most slots any of the header's 256 hash tables names (0 for a file too short)."""
    header = os.pread(fd, 2048, 0)
    if len(header) < 2048:
        return 0
    return max(struct.unpack("<512I", header)[1::2])


def _reader(fd: int, size: int) -> cdbx.CDB:
    """A cdb reader over the opened file; it owns fd from here on."""
    try:
        copy = (
            _private_copy(fd, size)
            if size <= PRIVATE_COPY_LIMIT or _longest_table(fd) > PREAD_TABLE_SLOTS
            else None
        )
    except BaseException:
        os.close(fd)
        raise
    if copy is None:  # not `or`: a reader's truth is its length, 0 for an empty cdb
        return cdbx.CDB(fd, close=True, mmap=False)
    os.close(fd)
    return copy


class _Failure:
    __slots__ = ("error", "identity", "until")

    def __init__(self, identity: Identity, until: float, error: OSError) -> None:
        self.identity = identity
        self.until = until
        self.error = error

    def raise_again(self) -> None:
        # A new exception each time: one raised again and again would chain its tracebacks.
        raise type(self.error)(*self.error.args)


class RulesFile:
    def __init__(self, path: bytes) -> None:
        self.path = path
        self._identity: Identity | None = None
        self._cdb: cdbx.CDB | None = None
        self._cidr_lengths: CidrLengths = NO_CIDR  # read once per opened file
        self._failure: _Failure | None = None
        self._verdicts: dict[tuple[bytes, bytes | None, bytes | None], Verdict] = {}

    def _current(self) -> cdbx.CDB:
        identity = _identity(os.stat(self.path))
        if identity == self._identity and self._cdb is not None:
            return self._cdb
        failure = self._failure
        if failure is not None and failure.identity == identity and time.monotonic() < failure.until:
            failure.raise_again()
        self.close()
        try:
            fd, status = _open_regular(self.path)
            cdb = _reader(fd, status.st_size)
        except OSError as error:
            if error.errno not in _TRANSIENT:
                self._failure = _Failure(identity, time.monotonic() + FAILURE_MEMORY, error)
            raise
        # The file opened may be newer than the one stat saw: remember the one opened.
        self._cidr_lengths = read_cidr_lengths(cdb.get)
        self._cdb = cdb
        self._identity = _identity(status)
        return cdb

    def decide(self, ip: bytes, host: bytes | None, info: bytes | None) -> Decision:
        """The rule for a client; OSError as the original reports it (cdb format errors included)."""
        return self.verdict(ip, host, info)[0]

    def verdict(self, ip: bytes, host: bytes | None, info: bytes | None) -> Verdict:
        """decide's rule, whether it denies, and its variables; kept for the file as opened."""
        reader = self._current()  # first: a changed file drops what was kept for the old one
        facts = (ip, host, info)
        verdict = self._verdicts.get(facts)
        if verdict is None:
            decision = find_rule(reader.get, ip, host, info, self._cidr_lengths)
            variables = tuple(decision.environment) if decision.data else ()
            verdict = (decision, decision.deny, variables)
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[facts] = verdict
        return verdict

    def close(self) -> None:
        if self._cdb is not None:
            self._cdb.close()
        self._cdb = None
        self._identity = None
        self._cidr_lengths = NO_CIDR
        self._failure = None
        self._verdicts = {}
