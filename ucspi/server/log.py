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
    import socket
    from collections.abc import Sequence

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


_PRINTABLE_TEXT = bytes(b if 32 <= b <= 126 and b != 0x25 else 0x3F for b in range(256))


def sanitize_text(text: bytes) -> bytes:
    """A reason in words (OpenSSL's, `certificate verify failed: ...`): spaces and colons kept, else as sanitize."""
    text = text.split(b"\x00", 1)[0]
    if len(text) >= 2 * _FIELD_LIMIT:
        return text[: 2 * _FIELD_LIMIT].translate(_PRINTABLE_TEXT) + b"..."
    return text.translate(_PRINTABLE_TEXT)


# -- the events ---------------------------------------------------------------------------
# Verbosity: 0 (-q) nothing; 1 (-Q) warnings and fatal errors; 2 (-v) everything.


class Event:
    """An event's fields are its dataclass fields; `ev` names it in the structured modes, where
    the fields become keys by the names of logformats.KEYS (a field without one keeps its own)."""

    __slots__ = ()
    verbosity = 2  # the least verbosity at which the event is written
    ev = ""  # the structured modes' name; empty: the class's name in lower case


@dataclass(frozen=True, slots=True)
class Listening(Event):
    """Structured modes only: a socket served, bound here or inherited from a supervisor."""

    ip: bytes
    port: int
    fd: int
    family: bytes  # `ipv4` or `ipv6`
    inherited: bool
    ev = "listen"


@dataclass(frozen=True, slots=True)
class Accepted(Event):
    """Structured modes only: a client accepted, before anything is known of it but its addresses."""

    ip: bytes
    port: int
    lip: bytes | None
    lport: int | None
    conns: int
    ev = "accept"


@dataclass(frozen=True, slots=True)
class Proxied(Event):
    """Structured modes only: what a PROXY header said (cmd `PROXY` or `LOCAL`; no addresses for LOCAL)."""

    ip: bytes | None
    port: int | None
    via: bytes
    via_port: int
    ver: int
    cmd: bytes
    ev = "proxy"


@dataclass(frozen=True, slots=True)
class Status(Event):
    children: int
    limit: int
    ev = "status"


@dataclass(frozen=True, slots=True)
class Served(Event):
    """A program was started for a client: the original's child's `pid` and `ok` lines."""

    pid: int
    peer: Peer
    rule: bytes | None = None  # the key of the rule that matched (structured modes only)
    ev = "ok"


@dataclass(frozen=True, slots=True)
class SpawnFailed(Event):
    """The `ok` line of a client whose program could not be run (the server's pid stands in)."""

    pid: int
    peer: Peer
    rule: bytes | None = None
    ev = "ok"


@dataclass(frozen=True, slots=True)
class Denied(Event):
    """A rule's deny, or a limit's refusal (limit: ` MAXCONNIP:n` or ` MAXCONNC:n/len`).

    The fields after `limit` are the structured modes' (the classic line has them in `limit`).
    """

    pid: int
    peer: Peer
    limit: bytes = b""
    rule: bytes | None = None
    reason: bytes = b"rule"  # `rule`, `maxconnip`, `maxconnc`
    ipconns: int | None = None
    ipmax: int | None = None
    netconns: int | None = None
    netmax: int | None = None
    net: bytes | None = None
    ev = "deny"


@dataclass(frozen=True, slots=True)
class ProgramEnded(Event):
    pid: int
    wait_status: int  # the structured modes show `status` (an exit) or `signal` (a name)
    ip: bytes | None = None
    dur_ms: int | None = None  # from accept to the reap
    ev = "end"


@dataclass(frozen=True, slots=True)
class ProxyNoted(Event):
    """At -v, what a PROXY header did beyond its addresses: a LOCAL header, a TLV value dropped."""

    text: bytes
    ev = "proxy"


@dataclass(frozen=True, slots=True)
class Warned(Event):
    text: bytes
    verbosity = 1
    ev = "warning"


@dataclass(frozen=True, slots=True)
class Dropped(Event):
    """A client closed without a program: `dropping connection, REASON`.

    The structured modes show `reason` as `text`, and `code` as `reason`: `proxy`, `banner`,
    `sockname`, `cdb`, `exec`, `fork`.
    """

    reason: bytes
    code: bytes = b""
    ip: bytes | None = None
    verbosity = 1
    ev = "drop"


@dataclass(frozen=True, slots=True)
class InternalError(Event):
    """A fault of ours in one connection: its type name, and where it was raised (file, line)."""

    type_name: bytes
    place: tuple[bytes, int] | None = None
    ip: bytes | None = None
    verbosity = 1
    ev = "drop"  # reason=internal


@dataclass(frozen=True, slots=True)
class Fatal(Event):
    text: bytes
    verbosity = 1
    ev = "fatal"


# sslserver (issue 14).


@dataclass(frozen=True, slots=True)
class TLSAccepted(Event):
    """At -v, a handshake done: `tls PID accept` (the server's pid); at -V `... accept PROTOCOL:CIPHER`."""

    pid: int
    protocol: bytes = b""
    cipher: bytes = b""
    ip: bytes | None = None
    ev = "tls"


@dataclass(frozen=True, slots=True)
class TLSFailed(Event):
    """`dropping connection, unable to accept SSL: REASON` (the handshake) or `unable to speak SSL:` (the relay)."""

    phase: bytes  # accept or speak
    reason: bytes
    ip: bytes | None = None
    verbosity = 1
    ev = "drop"  # reason=tls, as every other end without a program (logformats._tls_failed)


@dataclass(frozen=True, slots=True)
class TLSTruncated(Event):
    """At -v, the client's FIN without its close_notify during the relay (a truncation): `tls PID truncated`."""

    pid: int  # the program's, as in its `pid` and `end` lines
    ip: bytes | None = None
    ev = "truncated"


# Operations (issue 13). 0.88 writes none of these: classic mode writes only the stat lines
# (asked for by SIGUSR1), the structured modes all of them.


@dataclass(frozen=True, slots=True)
class SignalTaken(Event):
    """A signal the server acts on: its name (`TERM`) and what it does (`exit`, `drain`, `harden`, `stat`)."""

    name: bytes
    action: bytes
    ev = "signal"


@dataclass(frozen=True, slots=True)
class Draining(Event):
    """A drain began: the connections left, and the seconds the programs are given."""

    connections: int
    deadline_seconds: float
    ev = "drain"


@dataclass(frozen=True, slots=True)
class Exiting(Event):
    code: int
    ev = "exit"


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
    ev = "stat"


@dataclass(frozen=True, slots=True)
class StatClient(Event):
    """SIGUSR1's line per client address with live connections (the 100 busiest)."""

    ip: bytes
    connections: int
    oldest_seconds: int
    network: bytes  # the per-network limit's prefix, `10.1.2.0/24`
    network_connections: int
    verbosity = 1
    ev = "stat"


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
            case TLSAccepted(pid, protocol, cipher):
                if protocol:
                    return prefix + b"tls %d accept %s:%s\n" % (pid, sanitize(protocol), sanitize(cipher))
                return prefix + b"tls %d accept\n" % pid
            case TLSTruncated(pid):
                return prefix + b"tls %d truncated\n" % pid
            case TLSFailed(phase, reason):
                return prefix + b"warning: dropping connection, unable to %s SSL: %s\n" % (phase, sanitize_text(reason))
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
            case SignalTaken() | Draining() | Exiting() | Listening() | Accepted() | Proxied():
                return b""  # 0.88 says nothing here: classic stays byte-identical
        raise TypeError(f"no classic line for {type(event).__name__}")


LOG_FORMATS = ("classic", "logfmt", "json")


def make_log(verbosity: int, log_format: str = "classic", name: bytes = b"tcpserver") -> Log:
    """The Log of --log=FORMAT for the command called name (`tcpserver`, `sslserver`)."""
    if log_format == "classic":
        return Log(verbosity, ClassicFormat(name), name)
    from ucspi.server.logformats import JsonFormat, LogfmtFormat  # imported only when asked for

    formats = {"logfmt": LogfmtFormat, "json": JsonFormat}
    if log_format not in formats:
        raise ValueError(log_format)
    return Log(verbosity, formats[log_format](name), name)


def rule_key(key: bytes | None, cidr: bool) -> bytes | None:
    """The matched rule's key as tcprulescheck shows it (a CIDR key as `10.0.0.0/8`); None: no rule."""
    if key is not None and cidr:
        from ucspi.address import cidr_from_key, format_network

        network = cidr_from_key(key)
        if network is not None:
            return format_network(*network)
    return key


class Log:
    """Verbosity 0 (-q): nothing at all; 1 (-Q): warnings and fatal errors; 2 (-v): status too.

    `structured` is true for --log=logfmt and json: the emitters build the events (Listening,
    Accepted, Proxied) and the fields (a rule's key, a limit's counts) only those formats show.
    `accepts`: Accepted events are wanted (structured, at -v), asked once per accepted client.
    """

    def __init__(self, verbosity: int, formatter: Format | None = None, name: bytes = b"tcpserver") -> None:
        self.verbosity = verbosity
        self.name = name
        self.formatter: Format = formatter or ClassicFormat(name)
        self.structured = not isinstance(self.formatter, ClassicFormat)
        self.verbose = verbosity >= 2  # asked for every client: a plain attribute
        self.accepts = self.structured and self.verbose

    def emit(self, event: Event) -> None:
        if event.verbosity > self.verbosity:
            return
        try:
            line = self.formatter.format(event, self.verbosity)
        except Exception as error:  # the log must never take a connection or the server down
            line = self._format_failed(sanitize(type(error).__name__.encode()))
        if line:
            self._write(line)

    def _format_failed(self, type_name: bytes) -> bytes:
        if self.structured:
            try:  # still a line the format's readers can parse
                return self.formatter.format(Warned(b"internal error: " + type_name), self.verbosity)
            except Exception:
                pass
        return self.name + b": warning: internal error: " + type_name + b"\n"

    def _write(self, line: bytes) -> None:
        try:
            os.write(2, line)
        except OSError:
            pass  # a lost log line must never take the server down

    # Shorthands for the start-up code.
    def fatal(self, text: bytes) -> None:
        self.emit(Fatal(text))

    def fatal_message(self, message: bytes) -> None:
        """A start-up error made elsewhere as a whole line (`tcpserver: fatal: unable to bind: ...`).

        Classic writes it as it is; a structured format gets it as a Fatal event.
        """
        if not self.structured:
            if self.verbosity:
                if self.name != b"tcpserver" and message.startswith(b"tcpserver: "):
                    message = self.name + message[len(b"tcpserver") :]  # the shared start-up code's words
                self._write(message + b"\n")
            return
        # Start-up code names the command itself (`tcpserver: fatal: `): whatever the name, it goes.
        name, separator, text = message.partition(b": fatal: ")
        self.emit(Fatal(text if separator and b" " not in name else message))

    def warning(self, text: bytes) -> None:
        self.emit(Warned(text))

    def listening(self, listeners: Sequence[socket.socket], inherited: bool) -> None:
        """The structured modes' `listen` events, one per socket served (nothing in classic)."""
        if self.accepts:
            for listener in listeners:
                ip, port = listener.getsockname()[:2]
                family = b"ipv6" if ":" in ip else b"ipv4"
                self.emit(Listening(ip.encode(), port, listener.fileno(), family, inherited))

    def status(self, children: int, limit: int) -> None:
        if self.verbose:
            self.emit(Status(children, limit))
