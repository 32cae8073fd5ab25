"""The compiled rules file as readers use it: a cdb looked up with the shared order (spec 5).

The original reopens the cdb for every connection. RulesFile keeps it and reopens it when a
stat shows another file or a changed one (inode, size, mtime, ctime: tcprules renames a new file
in, chmod changes ctime), so every change is seen at the next lookup, as the original sees it.

The file is never mapped: one truncated in place under a mapping would kill the server with
SIGBUS. A file up to PRIVATE_COPY_LIMIT is read once into a private memory file, which is mapped
(lookups then make no system call); a bigger one is read with pread at each lookup.
"""

from __future__ import annotations

import os

import cdbx

from ucspi.rules.cidr import NO_CIDR, CidrLengths
from ucspi.rules.lookup import Decision, find_rule, read_cidr_lengths

PRIVATE_COPY_LIMIT = 64 << 20


def _private_copy(fd: int, size: int) -> cdbx.CDB | None:
    """The file's bytes in a memory file of our own, mapped; None where that cannot be had.

    Closes fd when it returns a reader. Read errors are the original's (a directory: EISDIR).
    """
    if size > PRIVATE_COPY_LIMIT or not hasattr(os, "memfd_create"):
        return None
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    try:
        memory_fd = os.memfd_create("ucspi-rules", os.MFD_CLOEXEC)
    except OSError:
        os.lseek(fd, 0, os.SEEK_SET)
        return None
    try:
        os.write(memory_fd, b"".join(chunks))
        reader = cdbx.CDB(memory_fd, close=True, mmap=None)
    except BaseException:
        os.close(memory_fd)
        raise
    os.close(fd)
    return reader


class RulesFile:
    def __init__(self, path: bytes) -> None:
        self.path = path
        self._identity: tuple[int, ...] | None = None
        self._cdb: cdbx.CDB | None = None
        self._cidr_lengths: CidrLengths = NO_CIDR  # read once per opened file

    def _reader(self) -> cdbx.CDB:
        status = os.stat(self.path)
        identity = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        if identity != self._identity or self._cdb is None:
            self.close()
            # Our own descriptor (close-on-exec) so that no child ever inherits it.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # The file opened may be newer than the one stat saw: remember the one opened.
                status = os.fstat(fd)
                identity = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
                cdb = _private_copy(fd, status.st_size)
                if cdb is None:  # not `or`: a reader's truth is its length, 0 for an empty cdb
                    cdb = cdbx.CDB(fd, close=True, mmap=False)
            except BaseException:
                os.close(fd)
                raise
            self._cidr_lengths = read_cidr_lengths(cdb.get)
            self._cdb = cdb
            self._identity = identity
        return self._cdb

    def decide(self, ip: bytes, host: bytes | None, info: bytes | None) -> Decision:
        """The rule for a client; OSError as the original reports it (cdb format errors included)."""
        reader = self._reader()
        return find_rule(reader.get, ip, host, info, self._cidr_lengths)

    def close(self) -> None:
        if self._cdb is not None:
            self._cdb.close()
        self._cdb = None
        self._identity = None
        self._cidr_lengths = NO_CIDR
