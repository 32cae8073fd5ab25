"""tcpserver's log lines on fd 2, byte for byte as the original writes them (spec 6.10)."""

from __future__ import annotations

import os

# Bytes < 33 or > 126, "%" (logger stupidity, says djb) and ":" (the field separator) become "?".
_PRINTABLE = bytes(b if 33 <= b <= 126 and b not in b"%:" else 0x3F for b in range(256))
_FIELD_LIMIT = 100


def sanitize(field: bytes) -> bytes:
    """One log field: made printable, cut at a NUL, and past 100 bytes cut with `...` appended."""
    field = field.split(b"\x00", 1)[0]
    # The original appends "..." as soon as it has copied 100 bytes, even if nothing follows.
    if len(field) >= _FIELD_LIMIT:
        return field[:_FIELD_LIMIT].translate(_PRINTABLE) + b"..."
    return field.translate(_PRINTABLE)


class Log:
    """Verbosity 0 (-q): nothing at all; 1 (-Q): warnings and fatal errors; 2 (-v): status too."""

    def __init__(self, verbosity: int) -> None:
        self.verbosity = verbosity

    def _write(self, line: bytes) -> None:
        try:
            os.write(2, line)
        except OSError:
            pass  # a lost log line must never take the server down

    def fatal(self, text: bytes) -> None:
        if self.verbosity:
            self._write(b"tcpserver: fatal: " + text + b"\n")

    def warning(self, text: bytes) -> None:
        if self.verbosity:
            self._write(b"tcpserver: warning: " + text + b"\n")

    def drop(self, text: bytes) -> None:
        self.warning(b"dropping connection, " + text)

    @property
    def verbose(self) -> bool:
        return self.verbosity >= 2

    def status(self, children: int, limit: int) -> None:
        if self.verbosity >= 2:
            self._write(b"tcpserver: status: %d/%d\n" % (children, limit))

    def end(self, pid: int, wait_status: int) -> None:
        if self.verbosity >= 2:
            self._write(b"tcpserver: end %d status %d\n" % (pid, wait_status))

    def served(self, pid: int, remote_ip: bytes, verdict_line: bytes) -> None:
        """The child's `pid P from IP` line and its `ok` line, written together after the spawn."""
        if self.verbosity >= 2:
            self._write(b"tcpserver: pid %d from %s\ntcpserver: %s" % (pid, remote_ip, verdict_line))

    def verdict(self, verdict_line: bytes) -> None:
        if self.verbosity >= 2:
            self._write(b"tcpserver: " + verdict_line)


def verdict_line(
    verdict: bytes,
    pid: int,
    local_host: bytes | None,
    local_ip: bytes,
    local_port: int,
    remote_host: bytes | None,
    remote_ip: bytes,
    remote_info: bytes | None,
    remote_port: int,
) -> bytes:
    """`ok|deny PID LOCALHOST:LOCALIP:LOCALPORT REMOTEHOST:REMOTEIP:REMOTEINFO:REMOTEPORT\\n`.

    The addresses are ours (dotted quads, or RFC 5952 text whose colons the IPv6 build leaves
    as they are); host names and ident replies are the client's, and made safe.
    """
    return b"%s %d %s:%s:%d %s:%s:%s:%d\n" % (
        verdict,
        pid,
        b"" if local_host is None else sanitize(local_host),
        local_ip,
        local_port,
        b"" if remote_host is None else sanitize(remote_host),
        remote_ip,
        b"" if remote_info is None else sanitize(remote_info),
        remote_port,
    )
