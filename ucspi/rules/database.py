"""The compiled rules file as readers use it: a cdb looked up with the shared order (spec 5).

The original reopens the cdb for every connection. RulesFile keeps it open and reopens it when a
stat shows another file or a changed one (inode, size, mtime, ctime: tcprules renames a new file
in, chmod changes ctime), so every change is seen at the next lookup, as the original sees it.
Reads go through pread, not mmap: a file truncated under a mapping would kill the server.
"""

from __future__ import annotations

import os

import cdbx

from ucspi.rules.cidr import NO_CIDR, CidrLengths
from ucspi.rules.lookup import Decision, find_rule, read_cidr_lengths


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
