"""--log=logfmt and --log=json (issue 13 item 4; README, Log formats).

Every event class of ucspi/server/log.py formatted in both modes and parsed back (json.loads, and
the small logfmt parser below); lines printable ASCII, one a line, under 1000 bytes; values from
outside escaped and capped. Then real servers: each event a client, a rule, a limit, a signal or
a failure causes, hostile host names, ident replies and PROXY headers, the lines through Debian's
`multilog t`, and classic mode still the original's lines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from conftest import needs_tool
from fakes import FakeDNS, FakeIdentd, fresh_loopback
from serverproc import (
    ORIGINAL_SERVER,
    OUR_SERVER,
    OUR_TCPRULES,
    ServerProcess,
    connect,
    mask_log_line,
    original_available,
    plain_environment,
    read_to_eof,
    rules_cdb,
    start_server,
    talk,
)

from ucspi.server import log as log_module
from ucspi.server.log import (
    Accepted,
    ClassicFormat,
    Event,
    Listening,
    Log,
    ProgramEnded,
    Proxied,
    make_log,
)
from ucspi.server.logformats import LINE_LIMIT, VALUE_LIMIT, JsonFormat, LogfmtFormat
from ucspi.server.peer import Peer
from ucspi.server.proxy import V2_SIGNATURE, crc32c

MODES = ["logfmt", "json"]

# -- reading the lines back ---------------------------------------------------------------------

_PAIR = re.compile(rb'([^ ="\\]+)(?:=("(?:[^"\\]|\\.)*"|[^ "=\\]+))?(?: |$)')
_ESCAPE = re.compile(rb"\\(x[0-9a-f]{2}|.)")
_NAMED = {b"\\": b"\\", b'"': b'"', b"n": b"\n", b"r": b"\r"}


def _unescape(match: re.Match[bytes]) -> bytes:
    code = match[1]
    if code.startswith(b"x") and len(code) == 3:
        return bytes([int(code[1:], 16)])
    assert code in _NAMED, f"unknown escape \\{code!r}"
    return _NAMED[code]


def parse_logfmt(line: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """(the prefix before `: `, the pairs in order; a bare key's value None); a bad line fails."""
    prefix, separator, rest = line.partition(b": ")
    assert separator, line
    pairs: list[tuple[str, bytes | None]] = []
    position = 0
    while position < len(rest):
        match = _PAIR.match(rest, position)
        assert match is not None and match.end() > position, f"unparsable at {position}: {line!r}"
        value = match[2]
        if value is not None and value.startswith(b'"'):
            value = _ESCAPE.sub(_unescape, value[1:-1])
        pairs.append((match[1].decode("ascii"), value))
        position = match.end()
    return prefix, pairs


def parsed(line: bytes, mode: str, name: str = "tcpserver") -> dict[str, object]:
    """One line of either mode as a dict, `ev` included; checks prog/prefix and `ev` come first."""
    assert all(32 <= byte <= 126 for byte in line), line
    assert len(line) + 1 <= LINE_LIMIT, len(line)
    if mode == "json":
        document = json.loads(line)
        assert list(document)[:2] == ["prog", "ev"] and document["prog"] == name, line
        return document
    prefix, pairs = parse_logfmt(line)
    assert prefix == name.encode() and pairs[0][0] == "ev", line
    fields: dict[str, object] = {}
    for key, value in pairs:
        assert key not in fields, f"{key} twice in {line!r}"
        fields[key] = None if value is None else value.decode("latin-1")
    return fields


def as_text(raw: bytes, mode: str) -> str:
    """What a reader gets back for bytes from outside (uncapped): latin-1 for logfmt's bytes,
    UTF-8 (a byte that is not: `\\xNN`) for JSON."""
    return raw.decode("utf-8", "backslashreplace") if mode == "json" else raw.decode("latin-1")


def events(lines: list[bytes], mode: str) -> list[dict[str, object]]:
    return [parsed(line, mode) for line in lines]


def of_kind(found: list[dict[str, object]], ev: str) -> list[dict[str, object]]:
    return [event for event in found if event["ev"] == ev]


def number(value: object) -> int:
    """A numeric field: an int from JSON, digits from logfmt."""
    return value if isinstance(value, int) else int(str(value))


# -- every event class, formatted directly ------------------------------------------------------

HOSTILE = b'ev"il =\\ \n\r\t\x00\x7f\xff\xc3\xa9 x=y'
PEER = Peer(b"127.0.0.1", 25, b'lo"cal', b"127.0.0.2", 40000, HOSTILE, b"j\x01oe", False, b"127.0.0.2")


def _sample(kind: type, field: dataclasses.Field) -> object:
    """A value for a field by its annotation (a string here: log.py uses `from __future__ import annotations`)."""
    annotation = str(field.type)
    if "Peer" in annotation:
        return PEER
    if annotation.startswith("tuple[bytes, int]"):
        return (HOSTILE, 7)
    for prefix, value in (("bytes", HOSTILE), ("str", "text"), ("bool", True), ("int", 7), ("float", 2.5)):
        if annotation.startswith(prefix):
            return value
    raise AssertionError(f"no sample value for {kind.__name__}.{field.name}: {annotation}")


EVENT_CLASSES = sorted(
    (
        value
        for value in vars(log_module).values()
        if isinstance(value, type) and issubclass(value, Event) and dataclasses.is_dataclass(value)
    ),
    key=lambda kind: kind.__name__,
)


def test_every_event_class_is_covered() -> None:
    names = {kind.__name__ for kind in EVENT_CLASSES}
    assert {"Status", "Served", "Denied", "ProgramEnded", "Dropped", "InternalError", "StatSummary"} <= names
    assert {"SignalTaken", "Draining", "Exiting", "StatClient", "Listening", "Accepted", "Proxied"} <= names


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", EVENT_CLASSES, ids=lambda kind: kind.__name__)
def test_every_event_formats_and_parses_back(kind: type, mode: str) -> None:
    event = kind(*(_sample(kind, field) for field in dataclasses.fields(kind)))
    formatter = LogfmtFormat() if mode == "logfmt" else JsonFormat()
    line = formatter.format(event, 2)
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    fields = parsed(line[:-1], mode)
    assert fields["ev"] == (kind.ev or kind.__name__.lower())
    assert len(fields) > 1  # every event has something to say
    # A value from outside comes back as it was (it is short enough not to be capped); a text
    # may hold it among words of ours (TLSFailed's `unable to PHASE SSL: REASON`).
    for key, value in fields.items():
        if key in ("host", "file") or (isinstance(value, str) and "evil" in value and key != "text"):
            assert value == as_text(HOSTILE, mode), (key, line)
        elif key == "text":
            assert isinstance(value, str) and as_text(HOSTILE, mode) in value, line


@pytest.mark.parametrize("mode", MODES)
def test_ok_and_deny_carry_the_peer_the_rule_and_the_limit(mode: str) -> None:
    formatter = LogfmtFormat() if mode == "logfmt" else JsonFormat()
    ok = parsed(formatter.format(log_module.Served(123, PEER, b"127.0.0.2"), 2)[:-1], mode)
    assert list(ok) == [*(["prog"] if mode == "json" else []), "ev", "pid", "ip", "port", "lip", "lport", "lhost",
                        "host", "info", "rule"]  # fmt: skip
    assert (ok["ev"], number(ok["pid"]), ok["ip"], number(ok["port"])) == ("ok", 123, "127.0.0.2", 40000)
    assert (ok["lip"], number(ok["lport"]), ok["rule"]) == ("127.0.0.1", 25, "127.0.0.2")
    assert (ok["host"], ok["info"], ok["lhost"]) == (as_text(HOSTILE, mode), "j\x01oe", 'lo"cal')
    deny = log_module.Denied(1, PEER, b" MAXCONNC:3/24", None, b"maxconnc", 1, None, 3, 3, b"127.0.0.0/24")
    fields = parsed(formatter.format(deny, 2)[:-1], mode)
    assert fields["reason"] == "maxconnc" and "rule" not in fields and "ipmax" not in fields
    assert (number(fields["ipconns"]), number(fields["netconns"]), number(fields["netmax"])) == (1, 3, 3)
    assert fields["net"] == "127.0.0.0/24"


@pytest.mark.parametrize("mode", MODES)
def test_a_tls_failure_is_a_drop(mode: str) -> None:
    formatter = LogfmtFormat(b"sslserver") if mode == "logfmt" else JsonFormat(b"sslserver")
    line = formatter.format(log_module.TLSFailed(b"accept", b"wrong version", b"127.0.0.2"), 1)
    fields = parsed(line[:-1], mode, "sslserver")
    assert (fields["ev"], fields["ip"], fields["reason"]) == ("drop", "127.0.0.2", "tls")
    assert fields["text"] == "unable to accept SSL: wrong version"
    accepted = parsed(formatter.format(log_module.TLSAccepted(7, ip=b"127.0.0.2"), 2)[:-1], mode, "sslserver")
    assert "protocol" not in accepted and "cipher" not in accepted  # empty by default: absent


@pytest.mark.parametrize("mode", MODES)
def test_end_says_status_or_signal(mode: str) -> None:
    formatter = LogfmtFormat() if mode == "logfmt" else JsonFormat()
    exited = parsed(formatter.format(ProgramEnded(9, 3 << 8, b"127.0.0.2", 15), 2)[:-1], mode)
    assert (number(exited["status"]), exited["ip"], number(exited["dur_ms"])) == (3, "127.0.0.2", 15)
    assert "signal" not in exited
    killed = parsed(formatter.format(ProgramEnded(9, signal.SIGKILL), 2)[:-1], mode)
    assert killed["signal"] == "KILL" and "status" not in killed and "ip" not in killed


def test_logfmt_escapes_every_byte_and_reads_back() -> None:
    for start in range(0, 256, 20):
        raw = bytes(range(start, min(start + 20, 256)))  # at most 4 bytes each escaped: never capped
        line = LogfmtFormat().format(log_module.Warned(raw), 1)
        assert all(32 <= byte <= 126 for byte in line[:-1])
        _, pairs = parse_logfmt(line[:-1])
        assert pairs == [("ev", b"warning"), ("text", raw)]
    assert LogfmtFormat().format(log_module.Warned(b"plain"), 1) == b"tcpserver: ev=warning text=plain\n"
    assert LogfmtFormat().format(log_module.Warned(b""), 1) == b'tcpserver: ev=warning text=""\n'
    assert LogfmtFormat().format(log_module.Warned(b"a b"), 1) == b'tcpserver: ev=warning text="a b"\n'
    assert LogfmtFormat().format(log_module.Warned(b"\\"), 1) == b'tcpserver: ev=warning text="\\\\"\n'


def test_json_is_ascii_and_bytes_that_are_not_utf8_read_as_backslash_x() -> None:
    text = 'h\u00e9llo \u2603 \U0001d11e "q" \\ \x01\n'
    line = JsonFormat().format(log_module.Warned(text.encode()), 1)
    assert line.isascii()
    assert json.loads(line)["text"] == text
    broken = json.loads(JsonFormat().format(log_module.Warned(b"a\xffb\xc3"), 1))
    assert broken["text"] == "a\\xffb\\xc3"


@pytest.mark.parametrize("mode", MODES)
def test_values_are_capped_at_100_escaped_bytes(mode: str) -> None:
    formatter = LogfmtFormat() if mode == "logfmt" else JsonFormat()
    long_plain = parsed(formatter.format(log_module.Warned(b"a" * 300), 1)[:-1], mode)
    assert long_plain["text"] == "a" * VALUE_LIMIT + "..."
    # Escapes are never cut in half: 4 (logfmt) or 6 (JSON) bytes each.
    line = formatter.format(log_module.Warned(b"\x01" * 300), 1)
    shown = parsed(line[:-1], mode)["text"]
    assert isinstance(shown, str) and shown == "\x01" * (VALUE_LIMIT // (4 if mode == "logfmt" else 6)) + "..."


@dataclasses.dataclass(frozen=True, slots=True)
class _Wide(Event):
    """An event with more from outside than a line can hold."""

    a: bytes
    b: bytes
    c: bytes
    d: bytes
    e: bytes
    f: bytes
    g: bytes
    h: bytes
    i: bytes
    j: bytes
    k: bytes
    ev = "wide"


@pytest.mark.parametrize("mode", MODES)
def test_a_line_past_999_bytes_is_cut(mode: str) -> None:
    formatter = LogfmtFormat() if mode == "logfmt" else JsonFormat()
    line = formatter.format(_Wide(*[b"\x01" * 40] * 11), 2)  # 160 bytes a value in logfmt, 240 in JSON
    assert len(line) <= LINE_LIMIT and line.endswith(b"\n")
    fields = parsed(line[:-1], mode)
    assert fields["ev"] == "wide" and "a" in fields and "k" not in fields
    if mode == "json":
        assert fields["cut"] is True
    else:
        assert line.endswith(b" ...\n") and "..." in fields


def test_classic_writes_nothing_for_the_structured_only_events() -> None:
    classic = ClassicFormat()
    assert classic.format(Listening(b"0.0.0.0", 25, 3, b"ipv4", False), 2) == b""
    assert classic.format(Accepted(b"127.0.0.1", 5, None, None, 1), 2) == b""
    assert classic.format(Proxied(None, None, b"127.0.0.1", 5, 2, b"LOCAL"), 2) == b""
    log = make_log(2)
    assert isinstance(log.formatter, ClassicFormat) and not log.structured and not log.accepts
    assert make_log(2, "json").accepts and not make_log(1, "logfmt").accepts
    assert make_log(1, "logfmt", b"sslserver").formatter.format(log_module.Warned(b"x"), 1) == (
        b"sslserver: ev=warning text=x\n"
    )
    assert isinstance(Log(2).formatter, ClassicFormat)


# -- real servers ---------------------------------------------------------------------------------

PROGRAM = ["sh", "-c", "cat >/dev/null; echo served"]


@contextmanager
def server_in(mode: str, options: list[str], program: list[str] = PROGRAM, **kwargs: object) -> Iterator[ServerProcess]:
    with start_server(OUR_SERVER.command, ["-v", f"--log={mode}", *options], program, **kwargs) as server:  # type: ignore[arg-type]
        yield server


def wait_for_event(server: ServerProcess, mode: str, ev: str, count: int = 1, timeout: float = 5.0) -> None:
    pattern = rf'"ev":"{ev}"' if mode == "json" else rf"^tcpserver: ev={ev}( |$)"
    server.wait_for_log(pattern, count=count, timeout=timeout)


@pytest.mark.parametrize("mode", MODES)
def test_a_server_s_events_parse_back(tmp_path: Path, mode: str) -> None:
    cdb = rules_cdb(tmp_path, "127.0.0.2:deny\n127.0.0.0/8:allow\n", tcprules=OUR_TCPRULES)
    options = ["-H", "-R", "-l0", "-C", "1", "--max-per-net=1", "-x", os.fspath(cdb)]
    with server_in(mode, options, host="0") as server:
        with connect(server.port) as held:
            wait_for_event(server, mode, "ok")
            assert talk(server.port) == b""  # 127.0.0.1 again: refused by -C 1
            assert talk(server.port, source="127.0.0.2") == b""  # the rule's deny
            assert talk(server.port, source="127.0.0.3") == b""  # its /24 is full
            held.shutdown(socket.SHUT_WR)
            assert read_to_eof(held) == b"served\n"
        wait_for_event(server, mode, "end")
        server.signal(signal.SIGUSR1)
        wait_for_event(server, mode, "stat")
        server.stop()
        found = events(server.log(), mode)
    kinds = [event["ev"] for event in found]
    assert kinds[:2] == ["listen", "status"], kinds
    listen = found[0]
    assert (listen["ip"], number(listen["port"]), listen["family"]) == ("0.0.0.0", server.port, "ipv4")
    assert listen["inherited"] in (False, "false")
    accepts = of_kind(found, "accept")
    assert len(accepts) == 4 and all(event["lip"] == "127.0.0.1" for event in accepts[:2])
    (ok,) = of_kind(found, "ok")
    assert (ok["ip"], ok["lip"], ok["rule"]) == ("127.0.0.1", "127.0.0.1", "127.0.0.0/8")
    assert number(ok["lport"]) == server.port and "host" not in ok and number(ok["pid"]) > 0
    limit, rule, network = of_kind(found, "deny")
    assert (limit["reason"], number(limit["ipconns"]), number(limit["ipmax"]), limit["rule"]) == (
        "maxconnip",
        1,
        1,
        "127.0.0.0/8",
    )
    assert (number(limit["netconns"]), number(limit["netmax"]), limit["net"]) == (1, 1, "127.0.0.0/24")
    assert (rule["reason"], rule["ip"], rule["rule"]) == ("rule", "127.0.0.2", "127.0.0.2")
    assert "ipconns" not in rule
    assert (network["reason"], network["ip"], network["net"]) == ("maxconnc", "127.0.0.3", "127.0.0.0/24")
    assert (number(network["ipconns"]), number(network["ipmax"]), number(network["netconns"])) == (0, 1, 1)
    (end,) = of_kind(found, "end")
    assert (number(end["pid"]), end["ip"], number(end["status"])) == (number(ok["pid"]), "127.0.0.1", 0)
    assert 0 <= number(end["dur_ms"]) < 10_000
    assert number(of_kind(found, "stat")[0]["denied"]) == 1
    assert [event["sig"] for event in of_kind(found, "signal")] == ["USR1", "TERM"]
    assert number(of_kind(found, "exit")[-1]["code"]) == 0
    assert {number(event["conns"]) for event in of_kind(found, "status")} == {0, 1, 2}
    assert number(of_kind(found, "stat")[0]["refused"]) == 2


@pytest.mark.parametrize("mode", MODES)
def test_drops_say_their_reason(tmp_path: Path, mode: str) -> None:
    with server_in(mode, ["-H", "-R", "-l0", "-x", os.fspath(tmp_path / "missing.cdb")]) as server:
        talk(server.port)
        wait_for_event(server, mode, "drop")
        (drop,) = of_kind(events(server.log(), mode), "drop")
    assert (drop["ip"], drop["reason"]) == ("127.0.0.1", "cdb")
    text = f"unable to read {tmp_path}/missing.cdb: file does not exist"
    assert drop["text"] == (text if len(text) <= VALUE_LIMIT else text[:VALUE_LIMIT] + "...")
    with server_in(mode, ["-H", "-R", "-l0"], ["/nonexistent/program"]) as server:
        talk(server.port)
        wait_for_event(server, mode, "drop")
        found = events(server.log(), mode)
    (ok,) = of_kind(found, "ok")
    (drop,) = of_kind(found, "drop")
    assert (drop["reason"], drop["text"]) == ("exec", "unable to run /nonexistent/program: file does not exist")
    assert "rule" not in ok  # no rules, no rule key


@pytest.mark.parametrize("mode", MODES)
def test_a_fatal_start_up_error_is_an_event(mode: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = subprocess.run(
            [os.fspath(OUR_SERVER.command), f"--log={mode}", "127.0.0.1", str(taken.getsockname()[1]), "true"],
            capture_output=True,
            timeout=10,
            env={"PATH": os.environ["PATH"]},
            check=False,
        )
    assert result.returncode == 111
    (line,) = result.stderr.splitlines()
    fatal = parsed(line, mode)
    assert (fatal["ev"], fatal["text"]) == ("fatal", "unable to bind: address already used")


def _ident_reply(_request: bytes) -> bytes:
    return b'1 , 2 : USERID : UNIX : j"o=e\\\x01\xff\x7fx\r\n'


PRINT_NAMES = ["sh", "-c", 'printf "%s\\0%s\\0%s" "$TCPREMOTEHOST" "$TCPREMOTEINFO" "$TCPLOCALHOST"']


@pytest.mark.parametrize("mode", MODES)
def test_hostile_host_names_and_ident_replies_are_escaped(mode: str) -> None:
    ip = fresh_loopback()
    hostile_name = (b'ev"il=x', b"\x01\xff \\a", b"com")
    local_name = 'lo cal"=\\\x7f'
    with ExitStack() as stack:
        stack.enter_context(FakeDNS(ip, ptr={ip: hostile_name}))
        stack.enter_context(FakeIdentd(ip, reply=_ident_reply))
        server = stack.enter_context(
            server_in(
                mode,
                ["-h", "-r", "-t", "5", "-l", local_name],
                PRINT_NAMES,
                environment=plain_environment({b"DNSCACHEIP": ip.encode()}),
            )
        )
        reply = talk(server.port, source=ip, timeout=10)
        wait_for_event(server, mode, "end")
        found = events(server.log(), mode)
    host, info, local = reply.split(b"\0")
    # What the program got: the name in djb's escaped text form (`\\042`), the reply raw.
    assert b"\\" in host and b'"' in info and b"\\" in info and b"\xff" in info
    (ok,) = of_kind(found, "ok")
    assert (ok["host"], ok["info"], ok["lhost"]) == (as_text(host, mode), as_text(info, mode), as_text(local, mode))


def _v2_header(tlvs: bytes) -> bytes:
    block = socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1") + struct.pack("!HH", 5555, 25) + tlvs
    unsigned = V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(block)) + block
    return unsigned[:-4] + crc32c(unsigned).to_bytes(4, "big")


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


@pytest.mark.parametrize("mode", MODES)
def test_proxy_headers_and_their_tlvs(mode: str) -> None:
    tlvs = _tlv(0x02, b'x"y=\\z\x01\xff') + _tlv(0x05, b'id\x00"nul\n') + _tlv(0x03, b"\x00" * 4)
    with server_in(mode, ["-H", "-R", "-l0", "--proxy-from=127.0.0.1/32"]) as server:
        with connect(server.port) as client:
            client.sendall(_v2_header(tlvs) + b"data")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b"served\n"
            client_port = client.getsockname()[1]
        talk(server.port, b"PROXY TCP4 192.0.2.07 198.51.100.1 5555 25\r\n")
        wait_for_event(server, mode, "drop")
        wait_for_event(server, mode, "end")
        found = events(server.log(), mode)
    header, note = of_kind(found, "proxy")
    assert (header["ip"], number(header["port"]), header["via"], number(header["via_port"])) == (
        "192.0.2.7",
        5555,
        "127.0.0.1",
        client_port,
    )
    assert (number(header["ver"]), header["cmd"]) == (2, "PROXY")
    assert note["text"] == "TLV value for PROXY_UNIQUE_ID from 127.0.0.1 dropped"
    (ok,) = of_kind(found, "ok")
    assert (ok["ip"], number(ok["port"]), ok["lip"], number(ok["lport"])) == ("192.0.2.7", 5555, "198.51.100.1", 25)
    (drop,) = of_kind(found, "drop")
    assert (drop["reason"], drop["text"]) == ("proxy", "bad PROXY header from 127.0.0.1: bad address in v1 line")


# -- multilog -------------------------------------------------------------------------------------

_TAI64N = re.compile(rb"^@4[0-9a-f]{23} ")


@needs_tool("multilog", "daemontools")
@pytest.mark.parametrize("mode", MODES)
def test_lines_through_multilog_one_line_an_event(tmp_path: Path, mode: str) -> None:
    directory = tmp_path / "main"
    multilog = subprocess.Popen(["multilog", "t", os.fspath(directory)], stdin=subprocess.PIPE, cwd=tmp_path)
    assert multilog.stdin is not None
    server = subprocess.Popen(
        [os.fspath(OUR_SERVER.command), "-v", "-1", f"--log={mode}", "-H", "-R", "-l", "a b\"c\n=d", "127.0.0.1",
         "0", *PROGRAM],
        stdout=subprocess.PIPE,
        stderr=multilog.stdin,
        env={"PATH": os.environ["PATH"]},
    )  # fmt: skip
    multilog.stdin.close()  # the server's stderr holds it now
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        for _ in range(3):
            assert talk(port) == b"served\n"
        os.kill(server.pid, signal.SIGUSR1)
        time.sleep(0.3)  # the stat lines and the last end lines, written before the TERM's
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(10) == 0
        assert multilog.wait(10) == 0  # EOF once the server and its programs are gone
    finally:
        for process in (server, multilog):
            if process.poll() is None:
                process.kill()
                process.wait(5)
        if server.stdout is not None:
            server.stdout.close()
    lines = (directory / "current").read_bytes().split(b"\n")
    assert lines[-1] == b""
    found = []
    for line in lines[:-1]:
        assert _TAI64N.match(line), line
        found.append(parsed(line.split(b" ", 1)[1], mode))
    kinds = [event["ev"] for event in found]
    assert kinds.count("ok") == kinds.count("end") == kinds.count("accept") == 3
    assert kinds[0] == "listen" and kinds[-1] == "exit"
    assert all(event["lhost"] == 'a b"c\n=d' for event in of_kind(found, "ok"))


# -- classic ----------------------------------------------------------------------------------------


def _classic_run(command: Path, options: list[str], directory: Path) -> list[bytes]:
    cdb = rules_cdb(directory, "127.0.0.2:deny\n:allow\n")
    with start_server(
        command, ["-v", "-H", "-R", "-l0", "-x", os.fspath(cdb), *options], ["sh", "-c", "exit 3"]
    ) as server:
        talk(server.port)
        server.wait_for_log(r"^tcpserver: end ")
        talk(server.port, source="127.0.0.2")
        server.wait_for_log(r"^tcpserver: deny ")
        server.wait_for_log(r"^tcpserver: status: 0/40$", count=3)
        return [mask_log_line(line) for line in server.log()]


@pytest.mark.skipif(not original_available(), reason="no /usr/bin/tcpserver (Debian: apt-get install ucspi-tcp)")
def test_classic_is_still_the_original_s_lines(tmp_path: Path) -> None:
    (tmp_path / "original").mkdir()
    (tmp_path / "ours").mkdir()
    original = _classic_run(ORIGINAL_SERVER.command, [], tmp_path / "original")
    ours = _classic_run(OUR_SERVER.command, ["--log=classic"], tmp_path / "ours")
    # The original forks a child for a denied client too (README, differences item 1): its pid
    # and end lines are the difference 0.88 users already have.
    child_of_deny = (b"tcpserver: pid PID from 127.0.0.2", b"tcpserver: end PID status 25600")
    assert ours == [line for line in original if line not in child_of_deny]
    assert b"tcpserver: end PID status 768" in ours


def test_bad_log_format_is_a_usage_error() -> None:
    result = subprocess.run(
        [os.fspath(OUR_SERVER.command), "--log=yaml", "127.0.0.1", "0", "true"],
        capture_output=True,
        timeout=10,
        env={"PATH": os.environ["PATH"]},
        check=False,
    )
    assert result.returncode == 100
    assert result.stderr.startswith(b"tcpserver: fatal: bad value for --log: yaml")


# -- faults ---------------------------------------------------------------------------------------

FAULTS = Path(__file__).resolve().parents[1] / "support" / "faults.py"
PYTHON = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"


def _faulty_server(mode: str, target: str, calls: list[int]) -> ServerProcess:
    spec = json.dumps([{"target": target, "calls": calls}])
    options = ["-v", f"--log={mode}", "-HRl0"]
    return start_server("tcpserver", options, ["sh", "-c", "echo served"], wrapper=[PYTHON, FAULTS, spec])


@pytest.mark.parametrize("mode", MODES)
def test_an_internal_error_is_a_drop_line(mode: str) -> None:
    with _faulty_server(mode, "ucspi.server.peer:PeerFacts.known", [1]) as server:
        assert talk(server.port) == b""
        assert talk(server.port) == b"served\n"
        wait_for_event(server, mode, "end")
        found = events(server.log(), mode)
    (drop,) = of_kind(found, "drop")
    assert (drop["ip"], drop["reason"], drop["text"]) == ("127.0.0.1", "internal", "InjectedFault")
    assert str(drop["file"]).endswith(".py") and number(drop["line"]) > 0


@pytest.mark.parametrize("mode", MODES)
def test_a_fault_in_the_format_still_writes_a_line_of_the_format(mode: str) -> None:
    # peer_pairs makes the ok line's addresses: its first call fails, the line becomes a warning.
    with _faulty_server(mode, "ucspi.server.logformats:peer_pairs", [1]) as server:
        assert talk(server.port) == b"served\n"
        assert talk(server.port) == b"served\n"
        wait_for_event(server, mode, "end", count=2)
        found = events(server.log(), mode)
    (warning,) = of_kind(found, "warning")
    assert warning["text"] == "internal error: InjectedFault"
    assert len(of_kind(found, "ok")) == 1


def _lines_until(stream: int, ending: bytes, timeout: float = 5.0) -> list[bytes]:
    """stderr lines up to one containing ending; TimeoutError when it does not come in time."""
    data = b""
    deadline = time.monotonic() + timeout
    while ending not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(data)
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream, 65536)
            if not chunk:
                break
            data += chunk
    return data.splitlines()


@pytest.mark.parametrize("mode", MODES)
def test_an_inherited_socket_s_listen_event(mode: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        server = subprocess.Popen(
            [
                os.fspath(OUR_SERVER.command),
                "-v",
                f"--log={mode}",
                "--inherit=stdin",
                "-HRl0",
                "127.0.0.1",
                "0",
                "true",
            ],
            stdin=listener.fileno(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ["PATH"]},
        )
    try:
        assert server.stderr is not None
        lines = _lines_until(server.stderr.fileno(), b"status")
    finally:
        server.terminate()
        server.wait(5)
        if server.stderr is not None:
            server.stderr.close()
    listen = parsed(lines[0], mode)
    assert (listen["ev"], listen["ip"], number(listen["port"]), listen["inherited"]) == (
        "listen",
        "127.0.0.1",
        port,
        True if mode == "json" else "true",
    )
    assert number(listen["fd"]) >= 3  # moved off fd 0


@pytest.mark.parametrize("mode", MODES)
def test_ipv6_and_v4_mapped_clients(mode: str) -> None:
    with server_in(mode, ["-H", "-R", "-l0"], host="::") as server:
        assert talk(server.port) == b"served\n"  # an IPv4 client of the dual-stack socket
        with socket.create_connection(("::1", server.port), timeout=5) as client:
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b"served\n"
        wait_for_event(server, mode, "end", count=2)
        found = events(server.log(), mode)
    (listen,) = of_kind(found, "listen")
    assert (listen["ip"], listen["family"]) == ("::", "ipv6")
    v4, v6 = of_kind(found, "accept")
    assert (v4["ip"], v4["lip"], v6["ip"], v6["lip"]) == ("127.0.0.1", "127.0.0.1", "::1", "::1")
    ok4, ok6 = of_kind(found, "ok")
    assert (ok4["ip"], ok4["lip"], ok6["ip"], ok6["lip"]) == ("127.0.0.1", "127.0.0.1", "::1", "::1")
    assert sorted(str(event["ip"]) for event in of_kind(found, "end")) == ["127.0.0.1", "::1"]  # in either order


@pytest.mark.parametrize("mode", MODES)
def test_a_fault_in_the_accept_event_still_serves_the_client(mode: str) -> None:
    # The accept event is made before the client is a connection: a fault there must not lose it.
    with _faulty_server(mode, "ucspi.server.loop:accepted_ip", [1]) as server:
        assert talk(server.port) == b"served\n"
        assert talk(server.port) == b"served\n"
        wait_for_event(server, mode, "end", count=2)
        found = events(server.log(), mode)
    (warning,) = of_kind(found, "warning")
    assert warning["text"] == "internal error: InjectedFault"
    assert len(of_kind(found, "accept")) == 1 and len(of_kind(found, "ok")) == 2


@pytest.mark.parametrize("mode", MODES)
def test_at_minus_capital_q_only_drops_warnings_and_fatal_errors(tmp_path: Path, mode: str) -> None:
    options = ["-Q", f"--log={mode}", "-H", "-R", "-l0", "-x", os.fspath(tmp_path / "missing.cdb")]
    with start_server(OUR_SERVER.command, options, PROGRAM) as server:
        talk(server.port)
        wait_for_event(server, mode, "drop")
        server.stop()
        found = events(server.log(), mode)
    assert [event["ev"] for event in found] == ["drop"]
