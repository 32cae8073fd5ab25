"""Security of a running tcpserver (issue 5, item 5): the privilege drop as the kernel shows it,
log lines that untrusted bytes cannot forge, rule values that reach the program exactly, denied
clients that never get the program, and clients that cannot take the server down.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest
from fakes import FakeDNS, FakeIdentd, fresh_loopback
from serverproc import (
    OUR_SERVER,
    OUR_TCPRULES,
    ServerProcess,
    connect,
    environment_entries,
    plain_environment,
    read_to_eof,
    rules_cdb,
    start_server,
    talk,
)
from serverstate import descriptors, in_threads, settled_descriptors, wait_idle, warnings

NOBODY = 65534  # nobody and nogroup on Debian
CAT_ENVIRON = ["/bin/cat", "/proc/self/environ"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing ids needs root")


# ---------------------------------------------------------------- privilege drop


def _ids(status: str) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, filesystem) and Groups from a /proc/PID/status text."""
    found = {}
    for line in status.splitlines():
        name, _, values = line.partition(":")
        if name in ("Uid", "Gid", "Groups"):
            found[name] = [int(value) for value in values.split()]
    return found


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_the_server_and_its_programs_run_as_nobody_nogroup_with_no_other_group(tmp_path: Path) -> None:
    """Started as root with supplementary groups, -u/-g leave the server (every thread of it) and
    each program with the one user and the one group, real, effective, saved and filesystem."""
    wrapper = tmp_path / "tcpserver-with-groups"
    # The groups the server starts with: root's plus adm (4) and sudo (27), to see them go.
    wrapper.write_text(f'#!/bin/sh\nexec setpriv --groups 0,4,27 -- {OUR_SERVER.command} "$@"\n')
    wrapper.chmod(0o755)
    options = ["-v", "-HRl0", "-u", str(NOBODY), "-g", str(NOBODY)]
    with start_server(wrapper, options, ["/bin/cat", "/proc/self/status"]) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        threads = os.listdir(f"/proc/{server.pid}/task")
        thread_ids = [_ids(Path(f"/proc/{server.pid}/task/{task}/status").read_text()) for task in threads]
        program_ids = _ids(talk(server.port).decode())
        wait_idle(server, 40)
    dropped = {"Uid": [NOBODY] * 4, "Gid": [NOBODY] * 4, "Groups": [NOBODY]}
    assert thread_ids == [dropped] * len(threads)
    assert program_ids == dropped


@needs_root
def test_without_u_and_g_the_ids_are_left_alone() -> None:
    with start_server(OUR_SERVER.command, ["-HRl0"], ["/bin/cat", "/proc/self/status"]) as server:
        program_ids = _ids(talk(server.port).decode())
        server_ids = _ids(Path(f"/proc/{server.pid}/status").read_text())
    assert server_ids["Uid"] == program_ids["Uid"] == [0] * 4
    assert server_ids["Gid"] == program_ids["Gid"] == [0] * 4


# ---------------------------------------------------------------- the log cannot be forged

# A log line as tcpserver writes it, and nothing else: one field may not spill into the next.
_LOG_LINE = re.compile(
    rb"^tcpserver: (?:status: \d+/\d+|pid \d+ from [0-9.]+|end \d+ status \d+"
    rb"|(?:ok|deny) \d+ [!-~]*:[0-9.]+:\d+ [!-~]*:[0-9.]+:[!-~]*:\d+)$"
)
# Every byte of a name the DNS can carry in a label, controls and escapes first.
_HOSTILE_LABELS = [
    b"\x1b[31mred\x1b[0m",
    b"new\nline",
    b"tab\there\r",
    b"nul\x00after",
    b"%s%n:colon",
    bytes(range(1, 60)),
    bytes(range(128, 191)),
]
_HOSTILE_INFO = b"1 , 2 : USERID : UNIX : \x1b]0;owned\x07\x01\x08\x7f\xff%:ok\x0bend\x00cut\r\n"


def _log_bytes_are_clean(server: ServerProcess) -> None:
    for line in server.log():
        assert all(32 <= byte <= 126 for byte in line), line
        assert _LOG_LINE.match(line), line


def _escaped(labels: list[bytes]) -> bytes:
    """The name as tcpserver shows it (docs/behaviour.md §6.8), written out here rather than taken from ucspi."""
    out = []
    for label in labels:
        text = bytearray()
        for byte in label.lower():
            if chr(byte) in "abcdefghijklmnopqrstuvwxyz0123456789-_":
                text.append(byte)
            else:
                text += b"\\%03o" % byte
        out.append(bytes(text))
    return b".".join(out)


def test_no_raw_control_byte_from_dns_ident_or_rules_reaches_the_log(tmp_path: Path) -> None:
    """PTR names made of control bytes, an ident reply full of them, rule values full of them:
    the -v log holds printable ASCII and newlines only, every line of the expected layout. The
    program gets the values as the original passes them: names escaped, ident raw up to a NUL."""
    ip = fresh_loopback()
    control = bytes(byte for byte in range(1, 32) if byte != 10) + b"\x7f\xff%:"
    rules = tmp_path / "rules.txt"
    rules.write_bytes(b'%s:allow,TCPLOCALHOST="%s",X="%s"\n' % (ip.encode(), control, control))
    cdb = rules_cdb(tmp_path, rules.read_bytes(), tcprules=OUR_TCPRULES)
    environment = plain_environment({b"DNSCACHEIP": ip.encode()})
    with (
        FakeDNS(ip, ptr={ip: _HOSTILE_LABELS, "127.0.0.1": _HOSTILE_LABELS[:3]}) as dns,
        FakeIdentd(ip, reply=_HOSTILE_INFO) as identd,
    ):
        with start_server(
            OUR_SERVER.command, ["-v", "-x", os.fspath(cdb)], CAT_ENVIRON, environment=environment
        ) as server:
            server.wait_for_log(r"^tcpserver: status: 0/40$")
            allowed = dict(entry.split(b"=", 1) for entry in environment_entries(talk(server.port, source=ip)))
            wait_idle(server, 40)
            rules_cdb(tmp_path, b"%s:deny\n" % ip.encode(), tcprules=OUR_TCPRULES)
            assert talk(server.port, source=ip) == b""
            wait_idle(server, 40)
            _log_bytes_are_clean(server)
            assert len([line for line in server.log() if line.startswith(b"tcpserver: deny ")]) == 1
    assert not dns.errors and not identd.errors
    assert allowed[b"TCPREMOTEHOST"] == _escaped(_HOSTILE_LABELS)
    assert allowed[b"TCPREMOTEINFO"] == b"\x1b]0;owned\x07\x01\x08\x7f\xff%:ok\x0bend"  # blanks gone, cut at NUL
    assert allowed[b"TCPLOCALHOST"] == allowed[b"X"] == control  # the rule's value, not the log's


# ---------------------------------------------------------------- rule values reach the program exactly

_ODD_VARIABLES = [
    (b"QUOTES", b"say \"hi\" and 'bye'"),
    (b"BACKSLASHES", b"\\back\\\\slash\\"),
    (b"HIGH", bytes(range(128, 256))),
    (b"TABS", b"\ttab\t in\tside\t"),
    (b"CONTROLS", bytes(byte for byte in range(1, 32) if byte not in (9, 10))),
    (b"PUNCTUATION", b"=,:;#@!%s%n$HOME `id` $(id) *?[]{}|&<>~"),
    (b"EMPTY", b""),
    (b"SPACES", b"  both ends  "),
    (b"name with spaces", b"v"),
    (b"\xe9t\xe9", b"\xe9"),
    (b"dash-name.dot", b"x"),
]


def _delimiter(value: bytes) -> bytes:
    # tcprules takes any byte after `=` as the delimiter; one the value does not hold.
    return next(bytes([byte]) for byte in b'"/+|^' if byte not in value)


def test_rule_values_with_odd_bytes_reach_the_program_exactly(tmp_path: Path) -> None:
    variables = b"".join(
        b",%s=%s%s%s" % (name, _delimiter(value), value, _delimiter(value)) for name, value in _ODD_VARIABLES
    )
    cdb = rules_cdb(tmp_path, b"127.0.0.1:allow" + variables + b"\n", tcprules=OUR_TCPRULES)
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "-x", os.fspath(cdb)], CAT_ENVIRON) as server:
        entries = environment_entries(talk(server.port))
        wait_idle(server, 40)
        _log_bytes_are_clean(server)
    # In rule order, after tcpserver's own variables, each byte for byte.
    assert entries[-len(_ODD_VARIABLES) :] == [name + b"=" + value for name, value in _ODD_VARIABLES]


# ---------------------------------------------------------------- a denied client never gets the program


@pytest.mark.parametrize(
    "rules",
    [
        "127.0.0.1:deny\n:allow\n",
        "127.:deny\n",
        "127.0.0.0-255:deny\n",
        "127.0.0.0/8:deny\n",
        "10.:allow\n:deny\n",
        '127.0.0.1:deny,MARKER="/tmp"\n',
    ],
)
def test_a_denied_client_never_gets_the_program(tmp_path: Path, rules: str) -> None:
    marker = tmp_path / "ran"
    marker.mkdir()
    cdb = rules_cdb(tmp_path, rules, tcprules=OUR_TCPRULES)
    program = ["/bin/sh", "-c", f"touch {marker}/$$; echo ran"]
    clients = 40
    options = ["-v", "-HRl0", "-B", "go away\n", "-c", "10", "-x", os.fspath(cdb)]
    with start_server(OUR_SERVER.command, options, program) as server:
        server.wait_for_log(r"^tcpserver: status: 0/10$")
        replies = in_threads(clients, lambda _: talk(server.port, b"let me in\n", timeout=10))
        server.wait_for_log(r"^tcpserver: deny ", count=clients)
        wait_idle(server, 10)
        log = server.log()
    assert replies == [b"go away\n"] * clients
    assert list(marker.iterdir()) == []
    assert not [line for line in log if re.match(rb"^tcpserver: (ok|pid|end) ", line)]
    assert [line for line in log if b"warning" in line] == []


# ---------------------------------------------------------------- what clients send cannot hurt the server


def test_nothing_a_client_sends_takes_the_server_down() -> None:
    """Garbage, floods, clients that never send or never read, half-closed and reset connections,
    all at once: afterwards the server serves as before, with the descriptors it had before."""
    # No complaint on stderr (the server's log) from programs whose clients are gone.
    program = ["/bin/sh", "-c", "exec 2>/dev/null; cat >/dev/null; echo ok"]
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "-c", "100", "-b", "256"], program) as server:
        used = settled_descriptors(server, 100)
        noise = random.Random(5)

        def garbage(_: int) -> bytes:
            return talk(server.port, noise.randbytes(65536), timeout=10)

        def flood(_: int) -> int:
            # 32 MB each, as fast as loopback takes it, then the program's answer.
            with connect(server.port, timeout=20) as client:
                block = bytes(range(256)) * 4096
                for _ in range(32):
                    client.sendall(block)
                client.shutdown(socket.SHUT_WR)
                return len(read_to_eof(client, timeout=20))

        # Clients that connect and go quiet: their programs wait on them, holding slots.
        silent = [connect(server.port) for _ in range(30)]
        # Clients that send and vanish at once, without reading the answer.
        for _ in range(100):
            with connect(server.port) as client:
                client.sendall(b"\x00\xff" * 1000)
        assert in_threads(20, garbage) == [b"ok\n"] * 20
        assert in_threads(4, flood) == [3] * 4
        assert talk(server.port, b"fine\n") == b"ok\n"  # served with 30 programs still waiting
        for client in silent:
            client.shutdown(socket.SHUT_WR)  # now half-closed: the programs finish
        assert [read_to_eof(client) for client in silent] == [b"ok\n"] * 30
        for client in silent:
            client.close()
        wait_idle(server, 100)
        assert server.alive()
        assert warnings(server) == []
        assert talk(server.port, b"after\n") == b"ok\n"
        wait_idle(server, 100)
        # Whatever the clients did, the server holds what it held before (nothing per client).
        deadline = time.monotonic() + 5
        while descriptors(server.pid) != used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert descriptors(server.pid) == used, (used, server.log()[-5:])


def test_clients_gone_during_their_lookups_are_still_decided_and_freed() -> None:
    """Clients reset while their ident lookup waits: the server still finishes each one (the
    program gets a dead socket), and no slot or descriptor is left behind."""
    ip = fresh_loopback()
    with FakeIdentd(ip, mode="silent"):
        with start_server(
            OUR_SERVER.command, ["-v", "-Hl0", "-t1"], ["/bin/sh", "-c", "exec echo late 2>/dev/null"]
        ) as server:
            used = settled_descriptors(server)
            for _ in range(30):
                client = connect(server.port, source=ip)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            server.wait_for_log(r"^tcpserver: end \d+ status", count=30, timeout=10)
            wait_idle(server, 40)
            assert server.alive()
            assert warnings(server) == []
            deadline = time.monotonic() + 5
            while descriptors(server.pid) != used and time.monotonic() < deadline:
                time.sleep(0.05)
            assert descriptors(server.pid) == used, (used, server.log()[-5:])
