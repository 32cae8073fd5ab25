"""tcpserver's log: typed events in, lines on fd 2 out (docs/behaviour.md §6.10).

The server and its connections emit events (a status change, a client served, denied or
dropped, a program's end, a warning, a fatal error) with their fields; a formatter turns each
into bytes. ClassicFormat writes what the original writes, byte for byte; a structured format is
another formatter on the same seam. No other module formats log text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ucspi.server.peer import Peer

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


# -- the events ---------------------------------------------------------------------------
# Verbosity: 0 (-q) nothing; 1 (-Q) warnings and fatal errors; 2 (-v) everything.


class Event:
    __slots__ = ()
    verbosity = 2  # the least verbosity at which the event is written


@dataclass(frozen=True, slots=True)
class Status(Event):
    children: int
    limit: int


@dataclass(frozen=True, slots=True)
class Served(Event):
    """A program was started for a client: the original's child's `pid` and `ok` lines."""

    pid: int
    peer: Peer


@dataclass(frozen=True, slots=True)
class SpawnFailed(Event):
    """The `ok` line of a client whose program could not be run (the server's pid stands in)."""

    pid: int
    peer: Peer


@dataclass(frozen=True, slots=True)
class Denied(Event):
    """A rule's deny, or a limit's refusal (limit: ` MAXCONNIP:n` or ` MAXCONNC:n/len`)."""

    pid: int
    peer: Peer
    limit: bytes = b""


@dataclass(frozen=True, slots=True)
class ProgramEnded(Event):
    pid: int
    wait_status: int


@dataclass(frozen=True, slots=True)
class ProxyNoted(Event):
    """At -v, what a PROXY header did beyond its addresses: a LOCAL header, a TLV value dropped."""

    text: bytes


@dataclass(frozen=True, slots=True)
class Warned(Event):
    text: bytes
    verbosity = 1


@dataclass(frozen=True, slots=True)
class Dropped(Event):
    """A client closed without a program: `dropping connection, REASON`."""

    reason: bytes
    verbosity = 1


@dataclass(frozen=True, slots=True)
class InternalError(Event):
    """A fault of ours in one connection: its type name, and where it was raised (file, line)."""

    type_name: bytes
    place: tuple[bytes, int] | None = None
    verbosity = 1


@dataclass(frozen=True, slots=True)
class Fatal(Event):
    text: bytes
    verbosity = 1


# Operations (issue 13). 0.88 writes none of these: classic mode writes only the stat lines
# (asked for by SIGUSR1), the structured modes all of them.


@dataclass(frozen=True, slots=True)
class SignalTaken(Event):
    """A signal the server acts on: its name (`TERM`) and what it does (`exit`, `drain`, `harden`, `stat`)."""

    name: bytes
    action: bytes


@dataclass(frozen=True, slots=True)
class Draining(Event):
    """A drain began: the connections left, and the seconds the programs are given."""

    connections: int
    deadline_seconds: float


@dataclass(frozen=True, slots=True)
class Exiting(Event):
    code: int


@dataclass(frozen=True, slots=True)
class StatSummary(Event):
    """SIGUSR1's first line (written at -Q and -v, never at -q)."""

    connections: int
    limit: int
    accepted: int
    denied: int
    refused: int  # by a per-address or per-network limit
    uptime_seconds: int
    verbosity = 1


@dataclass(frozen=True, slots=True)
class StatClient(Event):
    """SIGUSR1's line per client address with live connections (the 100 busiest)."""

    ip: bytes
    connections: int
    oldest_seconds: int
    network: bytes  # the per-network limit's prefix, `10.1.2.0/24`
    network_connections: int
    verbosity = 1


# -- formatting ---------------------------------------------------------------------------


class Format(Protocol):
    def format(self, event: Event, verbosity: int) -> bytes: ...


def verdict_line(verdict: bytes, pid: int, peer: Peer) -> bytes:
    """`ok|deny PID LOCALHOST:LOCALIP:LOCALPORT REMOTEHOST:REMOTEIP:REMOTEINFO:REMOTEPORT\\n`.

    The addresses are ours (dotted quads, or RFC 5952 text whose colons the IPv6 build leaves
    as they are); host names and ident replies are the client's, and made safe.
    """
    return b"%s %d %s:%s:%d %s:%s:%s:%d\n" % (
        verdict,
        pid,
        b"" if peer.local_host is None else sanitize(peer.local_host),
        peer.local_ip,
        peer.local_port,
        b"" if peer.remote_host is None else sanitize(peer.remote_host),
        peer.remote_ip,
        b"" if peer.remote_info is None else sanitize(peer.remote_info),
        peer.remote_port,
    )


class ClassicFormat:
    """The original's lines, prefixed with the command's name (`tcpserver: `, `sslserver: `)."""

    def __init__(self, name: bytes = b"tcpserver") -> None:
        self.prefix = name + b": "

    def format(self, event: Event, verbosity: int) -> bytes:
        prefix = self.prefix
        match event:
            case Status(children, limit):
                return prefix + b"status: %d/%d\n" % (children, limit)
            case Served(pid, peer):
                # The child's `pid P from IP` and `ok` lines, written together after the spawn.
                ok_line = verdict_line(b"ok", pid, peer)
                return b"%spid %d from %s\n%s%s" % (prefix, pid, peer.remote_ip, prefix, ok_line)
            case SpawnFailed(pid, peer):
                return prefix + verdict_line(b"ok", pid, peer)
            case Denied(pid, peer, limit):
                return prefix + verdict_line(b"deny", pid, peer)[:-1] + limit + b"\n"
            case ProgramEnded(pid, wait_status):
                return prefix + b"end %d status %d\n" % (pid, wait_status)
            case Dropped(reason):
                return prefix + b"warning: dropping connection, " + reason + b"\n"
            case InternalError(type_name, place):
                line = prefix + b"warning: dropping connection, internal error: " + sanitize(type_name) + b"\n"
                if place is not None and verbosity >= 2:
                    line += prefix + b"warning: internal error %s at %s line %d\n" % (
                        sanitize(type_name),
                        sanitize(place[0]),
                        place[1],
                    )
                return line
            case ProxyNoted(text):
                return prefix + b"proxy: " + text + b"\n"
            case Warned(text):
                return prefix + b"warning: " + text + b"\n"
            case Fatal(text):
                return prefix + b"fatal: " + text + b"\n"
            case StatSummary(connections, limit, accepted, denied, refused, uptime):
                return prefix + b"stat conns %d/%d accepted %d denied %d refused %d uptime %d\n" % (
                    connections,
                    limit,
                    accepted,
                    denied,
                    refused,
                    uptime,
                )
            case StatClient(ip, connections, oldest, network, network_connections):
                return prefix + b"stat ip %s conns %d oldest %d net %s netconns %d\n" % (
                    ip,
                    connections,
                    oldest,
                    network,
                    network_connections,
                )
            case SignalTaken() | Draining() | Exiting():
                return b""  # 0.88 says nothing here: classic stays byte-identical
        raise TypeError(f"no classic line for {type(event).__name__}")


class Log:
    """Verbosity 0 (-q): nothing at all; 1 (-Q): warnings and fatal errors; 2 (-v): status too."""

    def __init__(self, verbosity: int, formatter: Format | None = None, name: bytes = b"tcpserver") -> None:
        self.verbosity = verbosity
        self.name = name
        self.formatter: Format = formatter or ClassicFormat(name)

    @property
    def verbose(self) -> bool:
        return self.verbosity >= 2

    def emit(self, event: Event) -> None:
        if event.verbosity > self.verbosity:
            return
        try:
            line = self.formatter.format(event, self.verbosity)
        except Exception as error:  # the log must never take a connection or the server down
            line = self.name + b": warning: internal error: " + sanitize(type(error).__name__.encode()) + b"\n"
        if line:
            self._write(line)

    def _write(self, line: bytes) -> None:
        try:
            os.write(2, line)
        except OSError:
            pass  # a lost log line must never take the server down

    # Shorthands for the start-up code.
    def fatal(self, text: bytes) -> None:
        self.emit(Fatal(text))

    def warning(self, text: bytes) -> None:
        self.emit(Warned(text))

    def status(self, children: int, limit: int) -> None:
        if self.verbosity >= 2:
            self.emit(Status(children, limit))
