"""--log=logfmt and --log=json: the log's events as one line of keys and values each (README, Log formats).

Both formats are made from the same list of (key, value) pairs per event, `ev` first. An event's
pairs are its dataclass fields, named by KEYS (or by their own names), a Peer among them standing
for the client's addresses, names and ident reply, and None left out; the few events whose
fields need more than that (a wait status, a drop's code) have a function in _SPECIAL. So an
event added to log.py is logged with its `ev` name and nothing else. A field whose default is
b"" is left out when empty (TLSAccepted's protocol without -V).

No timestamps (multilog and svlogd add them). Every value from outside (host names, ident
replies, PROXY TLV text, file names, reasons: every bytes value) is escaped, then capped at 100
bytes with `...` appended; a line that would still pass 999 bytes, its newline included, loses
its last pairs for a ` ...` (logfmt) or `"cut":true` (json). Lines are printable ASCII.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from ucspi.server.log import (
    Denied,
    Dropped,
    Event,
    InternalError,
    ProgramEnded,
    SignalTaken,
    TLSFailed,
)
from ucspi.server.peer import Peer

VALUE_LIMIT = 100  # bytes of an escaped value, `...` not counted
LINE_LIMIT = 999  # bytes of a line, its newline included: multilog and svlogd look at 1000

# Field names -> the keys of spec §5.2, for every event that has such a field.
KEYS = {
    "children": "conns",
    "connections": "conns",
    "limit": "max",
    "deadline_seconds": "deadline_s",
    "uptime_seconds": "uptime_s",
    "oldest_seconds": "oldest_s",
    "network": "net",
    "network_connections": "netconns",
}
# Where one event's field means something else than the same name elsewhere.
_CLASS_KEYS: dict[type, dict[str, str]] = {SignalTaken: {"name": "sig"}}
_SKIPPED: dict[type, frozenset[str]] = {Denied: frozenset({"limit"})}  # the classic line's suffix

Pairs = list[tuple[str, object]]


def peer_pairs(peer: Peer) -> Pairs:
    pairs: Pairs = [("ip", peer.remote_ip), ("port", peer.remote_port), ("lip", peer.local_ip)]
    pairs.append(("lport", peer.local_port))
    if peer.local_host is not None:
        pairs.append(("lhost", peer.local_host))
    if peer.remote_host is not None:
        pairs.append(("host", peer.remote_host))
    if peer.remote_info is not None:
        pairs.append(("info", peer.remote_info))
    return pairs


_FIELD_NAMES: dict[type, tuple[tuple[str, str, bool], ...]] = {}


def _field_keys(kind: type) -> tuple[tuple[str, str, bool], ...]:
    """(field, key, whether b"" is its default: then empty means absent) for an event class, worked out once."""
    known = _FIELD_NAMES.get(kind)
    if known is None:
        renames = _CLASS_KEYS.get(kind, {})
        skipped = _SKIPPED.get(kind, frozenset())
        known = tuple(
            (field.name, renames.get(field.name) or KEYS.get(field.name, field.name), field.default == b"")
            for field in dataclasses.fields(kind)
            if field.name not in skipped
        )
        _FIELD_NAMES[kind] = known
    return known


def generic_pairs(event: Event) -> Pairs:
    """The fields but None, and but b"" where that is the default (an empty rule key `""` is a key)."""
    pairs: Pairs = []
    for field, key, empty_is_absent in _field_keys(type(event)):
        value = getattr(event, field)
        if value is None or (empty_is_absent and value == b""):
            continue
        if isinstance(value, Peer):
            pairs.extend(peer_pairs(value))
        else:
            pairs.append((key, value))
    return pairs


def _ended(event: ProgramEnded, _verbosity: int) -> Pairs:
    pairs: Pairs = [("pid", event.pid)]
    if event.ip is not None:
        pairs.append(("ip", event.ip))
    status = event.wait_status
    if os.WIFSIGNALED(status):
        pairs.append(("signal", signal_name(os.WTERMSIG(status))))
        if os.WCOREDUMP(status):
            pairs.append(("core", True))
    elif os.WIFEXITED(status):
        pairs.append(("status", os.WEXITSTATUS(status)))
    else:
        pairs.append(("wait_status", status))
    if event.dur_ms is not None:
        pairs.append(("dur_ms", event.dur_ms))
    return pairs


def _dropped(event: Dropped, _verbosity: int) -> Pairs:
    pairs: Pairs = []
    if event.ip is not None:
        pairs.append(("ip", event.ip))
    if event.code:
        pairs.append(("reason", event.code))
    pairs.append(("text", event.reason))
    return pairs


def _internal(event: InternalError, verbosity: int) -> Pairs:
    pairs: Pairs = []
    if event.ip is not None:
        pairs.append(("ip", event.ip))
    pairs += [("reason", b"internal"), ("text", event.type_name)]
    if event.place is not None and verbosity >= 2:  # as classic: where, at -v only
        pairs += [("file", event.place[0]), ("line", event.place[1])]
    return pairs


def _tls_failed(event: TLSFailed, _verbosity: int) -> Pairs:
    pairs: Pairs = [] if event.ip is None else [("ip", event.ip)]
    return [*pairs, ("reason", b"tls"), ("text", b"unable to %s SSL: %s" % (event.phase, event.reason))]


_SPECIAL: dict[type, Callable[..., Pairs]] = {
    ProgramEnded: _ended,
    Dropped: _dropped,
    InternalError: _internal,
    TLSFailed: _tls_failed,
}


def event_pairs(event: Event, verbosity: int) -> tuple[str, Pairs]:
    """The event's name and its pairs, absent fields left out."""
    special = _SPECIAL.get(type(event))
    pairs = special(event, verbosity) if special is not None else generic_pairs(event)
    return event.ev or type(event).__name__.lower(), pairs


def signal_name(number: int) -> bytes:
    import signal

    try:
        return signal.Signals(number).name.removeprefix("SIG").encode()
    except ValueError:
        return b"%d" % number


# -- logfmt -----------------------------------------------------------------------------------

# A bare value: printable, and no space, `=`, `"` or `\`.
_BARE = bytes(byte for byte in range(33, 127) if byte not in b'"=\\')


def _logfmt_piece(byte: int) -> bytes:
    named = {0x5C: b"\\\\", 0x22: b'\\"', 0x0A: b"\\n", 0x0D: b"\\r"}.get(byte)
    if named is not None:
        return named
    return bytes((byte,)) if 32 <= byte <= 126 else b"\\x%02x" % byte


_LOGFMT_PIECES = tuple(_logfmt_piece(byte) for byte in range(256))


def logfmt_text(raw: bytes) -> bytes:
    """A value from outside: bare if it can be, else quoted with `\\\\ \\" \\n \\r \\xNN`; capped."""
    if raw and len(raw) <= VALUE_LIMIT and not raw.translate(None, _BARE):
        return raw
    pieces = []
    size = 0
    cut = False
    shown = raw[: VALUE_LIMIT + 1]  # enough to know whether a cut is needed
    for byte in shown:
        piece = _LOGFMT_PIECES[byte]
        if size + len(piece) > VALUE_LIMIT:
            cut = True
            break
        pieces.append(piece)
        size += len(piece)
    text = b"".join(pieces) + (b"..." if cut else b"")
    if shown and not shown.translate(None, _BARE):
        return text  # long but plain: cut, no quotes needed
    return b'"' + text + b'"'


def logfmt_value(value: object) -> bytes:
    if isinstance(value, bytes):
        return logfmt_text(value)
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        return b"%d" % value if value.is_integer() else (b"%.3f" % value).rstrip(b"0")
    return logfmt_text(os.fsencode(str(value)))


class LogfmtFormat:
    """`tcpserver: ev=ok pid=123 ip=127.0.0.1 ...`: the command's name first, so `-tcpserver:*` matches."""

    def __init__(self, name: bytes = b"tcpserver") -> None:
        self.prefix = name + b": ev="

    def format(self, event: Event, verbosity: int) -> bytes:
        ev, pairs = event_pairs(event, verbosity)
        parts = [self.prefix + ev.encode()]
        size = len(parts[0]) + 1  # the newline
        for key, value in pairs:
            part = b" " + key.encode() + b"=" + logfmt_value(value)
            parts.append(part)
            size += len(part)
        if size > LINE_LIMIT:
            while size + 4 > LINE_LIMIT and len(parts) > 1:
                size -= len(parts.pop())
            parts.append(b" ...")
        parts.append(b"\n")
        return b"".join(parts)


# -- JSON -------------------------------------------------------------------------------------

# Printable ASCII but `"` and `\`: as it is in a JSON string.
_JSON_PLAIN = bytes(byte for byte in range(32, 127) if byte not in b'"\\')
_JSON_NAMED = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_piece(char: str) -> str:
    named = _JSON_NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if 32 <= code < 127:
        return char
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_text(raw: bytes) -> str:
    """A JSON string (ASCII only) of bytes from outside; a byte that is not UTF-8 shows as the
    four characters `\\xNN` (Python's backslashreplace). Capped at 100 bytes of escaped text."""
    if len(raw) <= VALUE_LIMIT and not raw.translate(None, _JSON_PLAIN):
        return '"' + raw.decode("ascii") + '"'
    # 100 escaped bytes show at most 100 characters of at most 4 bytes: a character cut here is never shown.
    text = raw[: 4 * VALUE_LIMIT + 4].decode("utf-8", "backslashreplace")
    pieces = []
    size = 0
    cut = False
    for char in text:
        piece = _json_piece(char)
        if size + len(piece) > VALUE_LIMIT:
            cut = True
            break
        pieces.append(piece)
        size += len(piece)
    return '"' + "".join(pieces) + ("..." if cut else "") + '"'


def json_value(value: object) -> str:
    if isinstance(value, bytes):
        return json_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.3f}".rstrip("0")
    return json_text(os.fsencode(str(value)))


class JsonFormat:
    """`{"prog":"tcpserver","ev":"ok","pid":123,...}`: a bare object a line, `prog` first."""

    def __init__(self, name: bytes = b"tcpserver") -> None:
        self.head = '{"prog":' + json_text(name) + ',"ev":'

    def format(self, event: Event, verbosity: int) -> bytes:
        ev, pairs = event_pairs(event, verbosity)
        parts = [self.head + json_text(ev.encode())]
        size = len(parts[0]) + 2  # `}` and the newline
        for key, value in pairs:
            part = ',"' + key + '":' + json_value(value)
            parts.append(part)
            size += len(part)
        if size > LINE_LIMIT:
            cut = ',"cut":true'
            while size + len(cut) > LINE_LIMIT and len(parts) > 1:
                size -= len(parts.pop())
            parts.append(cut)
        parts.append("}\n")
        return "".join(parts).encode("ascii")
