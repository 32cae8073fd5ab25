"""Per-address and per-network limits (-C, --max-per-ip, --max-per-net, MAXCONNIP, MAXCONNC,
DIEMSG): a client at its limit gets the banner, the message and EOF, with no child and its slot
back at once; the counts never drift, whatever ends a connection."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_tool
from fakes import fresh_loopback
from serverproc import (
    OUR_SERVER,
    ServerProcess,
    connect,
    plain_environment,
    read_line,
    read_to_eof,
    rules_cdb,
    start_server,
    talk,
)
from serverstate import in_threads, wait_idle

# Says hello, then holds the connection until the client closes it.
HOLD = ["/bin/sh", "-c", 'echo "in $TCPCONCURRENCY $TCPCONNNUM"; exec cat >/dev/null']
REFUSAL = b"421 too many\r\n"
BANNER = b"220 hi "


def _hold(port: int, count: int, source: str | None = None, host: str = "127.0.0.1") -> list[socket.socket]:
    """count clients admitted and holding their program; each has read its hello line."""
    held = []
    for _ in range(count):
        client = connect(port, host=host, source=source) if host != "::1" else _connect6(port)
        assert read_line(client).removeprefix(BANNER).startswith(b"in "), "not admitted"
        held.append(client)
    return held


def _connect6(port: int) -> socket.socket:
    client = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(("::1", port))
    return client


def _refused(port: int, source: str | None = None, host: str = "127.0.0.1") -> bytes:
    """What a client over the limit gets (it sends a line first, as an eager SMTP client may)."""
    client = connect(port, host=host, source=source) if host != "::1" else _connect6(port)
    with client:
        client.sendall(b"EHLO early\r\n")
        return read_to_eof(client)


def _close(clients: list[socket.socket]) -> None:
    for client in clients:
        client.close()


def test_the_client_past_the_limit_gets_the_banner_the_message_and_eof() -> None:
    options = ["-v", "-HRl0", "-B", BANNER.decode(), "-C", "2:421 too many\\r\\n"]
    with start_server(OUR_SERVER.command, options, HOLD) as server:
        held = _hold(server.port, 2)
        try:
            assert _refused(server.port) == BANNER + REFUSAL
            deny = server.wait_for_log(r"^tcpserver: deny ")[0]
            assert deny.endswith(b" MAXCONNIP:2")
            assert deny.startswith(b"tcpserver: deny %d 0:127.0.0.1:" % server.pid)
            # Its slot came back at once: taken at accept (3/40), given back after the deny line.
            lines = server.wait_for_log(r"^tcpserver: (status: |deny )", count=6)
            assert lines[3:] == [b"tcpserver: status: 3/40", deny, b"tcpserver: status: 2/40"]
        finally:
            _close(held[1:])
        server.wait_for_log(r"^tcpserver: end ")
        # One left: the next is admitted, and told it is the second.
        again = connect(server.port)
        with again:
            assert read_line(again) == BANNER + b"in 2 1\n"
        _close(held[:1])
        wait_idle(server, 40)


def test_the_program_learns_its_place_only_when_limits_are_on() -> None:
    program = ["/bin/sh", "-c", 'echo "${TCPCONCURRENCY-unset} ${TCPCONNNUM-unset} ${TCP6CONNNUM-unset}"']
    with start_server(OUR_SERVER.command, ["-HRl0"], program) as server:
        assert talk(server.port) == b"unset unset unset\n"
    with start_server(OUR_SERVER.command, ["-HRl0", "--max-per-ip=5"], program) as server:
        assert talk(server.port) == b"1 0 unset\n"


def test_ipv4_and_ipv6_clients_are_counted_apart() -> None:
    with start_server(OUR_SERVER.command, ["-HRl0", "-C", "1:busy"], HOLD, host="::") as server:
        held = _hold(server.port, 1) + _hold(server.port, 1, host="::1")
        try:
            assert _refused(server.port) == b"busy"
            assert _refused(server.port, host="::1") == b"busy"
        finally:
            _close(held)


def test_ipv4_networks_share_a_count() -> None:
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "--max-per-net=2/8/128:net busy\\n"], HOLD) as server:
        held = _hold(server.port, 1, source="127.0.0.1") + _hold(server.port, 1, source="127.0.0.2")
        try:
            assert _refused(server.port, source="127.0.0.3") == b"net busy\n"
            assert server.wait_for_log(r"^tcpserver: deny ")[0].endswith(b" MAXCONNC:2/8")
        finally:
            _close(held)


def test_rules_override_exempt_and_a_start_value_of_0(tmp_path: Path) -> None:
    cdb = rules_cdb(
        tmp_path,
        '127.0.0.1:allow,MAXCONNIP="1",DIEMSG="450 one only"\n127.0.0.2:allow,MAXCONNIP=""\n'
        '127.0.0.3:allow,MAXCONIP="0"\n:allow\n',
    )
    with start_server(OUR_SERVER.command, ["-HRl0", "-C", "3:three", "-x", str(cdb)], HOLD) as server:
        held = _hold(server.port, 1, source="127.0.0.1")
        try:
            assert _refused(server.port, source="127.0.0.1") == b"450 one only\r\n"  # DIEMSG, CRLF appended
            held += _hold(server.port, 5, source="127.0.0.2")  # exempt
            assert _refused(server.port, source="127.0.0.3") == b"three"  # a rule's 0 refuses
            held += _hold(server.port, 3, source="127.0.0.4")  # the option's 3
            assert _refused(server.port, source="127.0.0.4") == b"three"
        finally:
            _close(held)
    # MAXCONIP=0 at start: no limit (ucspi-tcp6); limits are on all the same, so a rule's value applies.
    environment = plain_environment({b"MAXCONIP": b"0"})
    with start_server(OUR_SERVER.command, ["-HRl0", "-x", str(cdb)], HOLD, environment=environment) as server:
        held = _hold(server.port, 4, source="127.0.0.5")
        try:
            held += _hold(server.port, 1, source="127.0.0.1")
            assert _refused(server.port, source="127.0.0.1") == b"450 one only\r\n"
        finally:
            _close(held)


def test_a_rule_variable_is_just_a_variable_without_limits(tmp_path: Path) -> None:
    cdb = rules_cdb(tmp_path, '127.0.0.1:allow,MAXCONNIP="0"\n')
    program = ["/bin/sh", "-c", 'echo "$MAXCONNIP ${TCPCONCURRENCY-unset}"']
    with start_server(OUR_SERVER.command, ["-HRl0", "-x", str(cdb)], program) as server:
        assert talk(server.port) == b"0 unset\n"


@pytest.mark.parametrize(
    "value",
    ["", "x", "-1", "1/33", "1/24/129", "1/24/64/8", "99999999999999999999", " 1", "1/8/"],
)
def test_bad_values_are_usage_errors(value: str) -> None:
    option = "--max-per-net=" + value if "/" in value else "--max-per-ip=" + value
    result = subprocess.run(
        [OUR_SERVER.command, option, "0", "0", "true"], capture_output=True, timeout=10, env={"PATH": "/bin"}
    )
    assert result.returncode == 100
    assert result.stderr == os.fsencode(f"tcpserver: fatal: bad value for {option.split('=')[0]}: {value}\n")


def test_counts_do_not_drift_whatever_ends_a_connection(tmp_path: Path) -> None:
    """2,000 connections from one /24: programs killed (odd client ports) or served, exec
    failures (E2BIG), rule denies, and refusals at the limits. Afterwards exactly n are admitted
    from the busy address and from the network, and the next is refused."""
    huge = "x" * 200_000
    cdb = rules_cdb(tmp_path, f'127.0.0.2:allow,HUGE="{huge}"\n127.0.0.3:deny\n:allow\n')
    killing = tmp_path / "killing"
    killing.touch()
    program = [
        "/bin/sh",
        "-c",
        f'[ -e {killing} ] && [ $((TCPREMOTEPORT % 2)) = 1 ] && kill -KILL $$; echo "in x"; exec cat >/dev/null',
    ]
    options = ["-v", "-HRl0", "-c", "100", "-b", "128", "-C", "3:full", "--max-per-net=6/24:netfull", "-x", str(cdb)]
    with start_server(OUR_SERVER.command, options, program) as server:
        sources = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"]
        for _ in range(50):
            in_threads(40, lambda index: talk(server.port, source=sources[index % 4], timeout=20))
        wait_idle(server, 100)
        killing.unlink()
        held = _hold(server.port, 3, source="127.0.0.1")
        try:
            assert _refused(server.port, source="127.0.0.1") == b"full"
            held += _hold(server.port, 3, source="127.0.0.4")
            assert _refused(server.port, source="127.0.0.5") == b"netfull"
        finally:
            _close(held)
        wait_idle(server, 100)


_IPV6_CLIENT = r"""
import socket, sys
port = int(sys.argv[1])
def client(source):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("fd00:1::1", port))
    return s
held = client("fd00:1::1")
print(held.recv(100).decode().strip())
same_net = client("fd00:1::2")
data = b""
while chunk := same_net.recv(100):
    data += chunk
print(repr(data))
other_net = client("fd00:2::1")
print(other_net.recv(100).decode().strip())
"""


@pytest.fixture
def two_ipv6_networks() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    namespace = f"ucspi-limits{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True, timeout=10)
    try:
        for command in (
            ["link", "set", "lo", "up"],
            ["addr", "add", "fd00:1::1/64", "dev", "lo", "nodad"],
            ["addr", "add", "fd00:1::2/64", "dev", "lo", "nodad"],
            ["addr", "add", "fd00:2::1/64", "dev", "lo", "nodad"],
        ):
            subprocess.run(["ip", "-n", namespace, *command], check=True, capture_output=True, timeout=10)
        yield namespace
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def test_ipv6_clients_of_one_64_share_a_count(two_ipv6_networks: str) -> None:
    in_namespace = ["ip", "netns", "exec", two_ipv6_networks]
    server: ServerProcess
    with start_server(
        OUR_SERVER.command, ["-HRl0", "--max-per-net=1/32/64:busy"], HOLD, host="::", wrapper=in_namespace
    ) as server:
        result = subprocess.run(
            [*in_namespace, sys.executable, "-c", _IPV6_CLIENT, str(server.port)],
            capture_output=True, timeout=30, check=True,
        )  # fmt: skip
    assert result.stdout.decode().splitlines() == ["in 1 0", "b'busy'", "in 1 0"]


def _free_port(ip: str) -> int:
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return probe.getsockname()[1]


@needs_tool("tcpsvd", "ipsvd")
def test_the_message_bytes_are_tcpsvds() -> None:
    """`-C 2:msg` with ipsvd's escapes: the third client gets the same bytes from both, and the
    admitted ones the same TCPCONCURRENCY."""
    message = "421 too many\\r\\nsecond line\\tkept\\\\"
    program = ["/bin/sh", "-c", 'echo "in $TCPCONCURRENCY"; exec cat >/dev/null']
    ip = fresh_loopback()
    port = _free_port(ip)
    tcpsvd = subprocess.Popen(
        ["tcpsvd", "-C", "2:" + message, ip, str(port), *program],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((ip, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "tcpsvd did not start"
                time.sleep(0.05)
        time.sleep(0.3)  # the probe's own connection ends
        theirs = _over_the_limit(port, ip)
    finally:
        tcpsvd.terminate()
        tcpsvd.wait(10)
    with start_server(OUR_SERVER.command, ["-HRl0", "-C", "2:" + message], program, host=ip) as server:
        ours = _over_the_limit(server.port, ip)
    assert ours == theirs
    assert ours[-1] == b"421 too many\r\nsecond line\\tkept\\"


def _over_the_limit(port: int, ip: str) -> list[bytes]:
    held = [connect(port, host=ip) for _ in range(2)]
    try:
        hellos = [read_line(client) for client in held]
        with connect(port, host=ip) as third:
            refusal = read_to_eof(third)
    finally:
        _close(held)
    return [*hellos, refusal]
