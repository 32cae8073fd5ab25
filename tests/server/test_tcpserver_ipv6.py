"""IPv6 serving: host 0 is 0.0.0.0 as in 0.88, `::` one dual-stack socket, IPv6 literals, -4, -6;
the environment and the log line of each kind of client (issues 6 and 9; differences items 3, 5
and 6)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import (
    ORIGINAL_SERVER,
    OUR_SERVER,
    OUR_TCPRULES,
    Implementation,
    launch,
    original_available,
    plain_environment,
    read_to_eof,
    rules_cdb,
    start_server,
)


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _ipv6_loopback_works(), reason="this machine has no IPv6 loopback (::1)")

# The program reports its environment as it got it, raw, in order.
SHOW_ENVIRONMENT = ["cat", "/proc/self/environ"]
BASE = plain_environment({b"FOO": b"bar"})


def fetch(port: int, host: str) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect((host, port))
        return read_to_eof(client)


def served(
    options: list[str], host: str, client: str, implementation: Implementation = OUR_SERVER
) -> tuple[list[bytes], list[bytes], int]:
    """(the program's environment entries, the server's log, the client's port)."""
    server = start_server(
        implementation.command, ["-v", "-HRl0", *options], SHOW_ENVIRONMENT, host=host, environment=BASE
    )
    try:
        entries = fetch(server.port, client).split(b"\0")[:-1]
        server.wait_for_log(r"^tcpserver: end \d+ status 0$")
    finally:
        server.stop()
    remote_port = int(next(e for e in entries if e.startswith(b"TCPREMOTEPORT=")).split(b"=")[1])
    return entries, server.log(), remote_port


def ipv4_environment(local_port: bytes, remote_port: bytes) -> list[bytes]:
    return [
        *BASE,
        b"PROTO=TCP",
        b"TCPLOCALIP=127.0.0.1",
        b"TCPLOCALPORT=" + local_port,
        b"TCPLOCALHOST=0",
        b"TCPREMOTEIP=127.0.0.1",
        b"TCPREMOTEPORT=" + remote_port,
    ]


def ipv6_environment(local_ip: bytes, remote_ip: bytes, local_port: bytes, remote_port: bytes) -> list[bytes]:
    """The order of Debian's IPv6 build: each variable, then its TCP6 twin."""
    return [
        *BASE,
        b"PROTO=TCP6",
        b"TCPLOCALIP=" + local_ip,
        b"TCP6LOCALIP=" + local_ip,
        b"TCPLOCALPORT=" + local_port,
        b"TCP6LOCALPORT=" + local_port,
        b"TCPLOCALHOST=0",
        b"TCP6LOCALHOST=0",
        b"TCPREMOTEIP=" + remote_ip,
        b"TCP6REMOTEIP=" + remote_ip,
        b"TCPREMOTEPORT=" + remote_port,
        b"TCP6REMOTEPORT=" + remote_port,
    ]


def _ports(entries: list[bytes]) -> tuple[bytes, bytes]:
    values = dict(entry.split(b"=", 1) for entry in entries)
    return values[b"TCPLOCALPORT"], values[b"TCPREMOTEPORT"]


IMPLEMENTATIONS = [
    pytest.param(OUR_SERVER, id="ours"),
    pytest.param(
        ORIGINAL_SERVER,
        id="original",
        marks=pytest.mark.skipif(not original_available(), reason="the original tcpserver is not installed"),
    ),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("host", ["0", "", "::"])
def test_ipv4_clients_of_host_0_and_of_the_dual_stack_socket_get_0_88_s_environment(
    host: str, implementation: Implementation
) -> None:
    if host == "::" and implementation is ORIGINAL_SERVER:
        pytest.skip("0.88 has no IPv6")
    entries, log, remote_port = served([], host, "127.0.0.1", implementation)
    local_port, remote = _ports(entries)
    assert entries == ipv4_environment(local_port, remote)
    assert any(line.startswith(b"tcpserver: pid ") and line.endswith(b" from 127.0.0.1") for line in log)
    assert any(line.endswith(b" 0:127.0.0.1:%s :127.0.0.1::%d" % (local_port, remote_port)) for line in log)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("options", [[], ["-4"]])
@pytest.mark.parametrize("host", ["0", ""])
def test_host_0_and_the_empty_host_listen_on_0_0_0_0_only(
    host: str, options: list[str], implementation: Implementation
) -> None:
    """As in 0.88: an IPv6 client is refused (and falls back to 127.0.0.1, where the rules for
    local clients are), -4 changes nothing."""
    if options and implementation is ORIGINAL_SERVER:
        pytest.skip("-4 is the IPv6 build's option; 0.88 calls it illegal")
    server = start_server(implementation.command, ["-HRl0", *options], SHOW_ENVIRONMENT, host=host, environment=BASE)
    try:
        with pytest.raises(ConnectionRefusedError):
            fetch(server.port, "::1")
        assert b"\0PROTO=TCP\0TCPLOCALIP=127.0.0.1\0" in fetch(server.port, "127.0.0.1")
    finally:
        server.stop()


def test_dual_stack_socket_serves_ipv6_clients_with_tcp6_variables_and_the_ipv6_log_layout() -> None:
    entries, log, remote_port = served([], "::", "::1")
    local_port, remote = _ports(entries)
    assert entries == ipv6_environment(b"::1", b"::1", local_port, remote)
    assert any(line.startswith(b"tcpserver: pid ") and line.endswith(b" from ::1") for line in log)
    assert any(line.endswith(b" 0:::1:%s :::1::%d" % (local_port, remote_port)) for line in log)


def test_ipv6_literal_host() -> None:
    entries, _log, _port = served([], "::1", "::1")
    local_port, remote = _ports(entries)
    assert entries == ipv6_environment(b"::1", b"::1", local_port, remote)


def test_minus_6_presents_ipv4_clients_of_the_dual_stack_socket_as_v4_mapped_ipv6() -> None:
    entries, log, remote_port = served(["-6"], "::", "127.0.0.1")
    local_port, remote = _ports(entries)
    mapped = b"::ffff:127.0.0.1"
    assert entries == ipv6_environment(mapped, mapped, local_port, remote)
    assert any(line.endswith(b" 0:%s:%s :%s::%d" % (mapped, local_port, mapped, remote_port)) for line in log)


@pytest.mark.parametrize("options", [[], ["-6"]])
def test_v4_mapped_clients_are_looked_up_by_their_dotted_quad(tmp_path: Path, options: list[str]) -> None:
    cdb = rules_cdb(tmp_path, '127.0.0.1:allow,WHO="v4 rule"\n:deny\n')
    server = start_server(
        OUR_SERVER.command, ["-HRl0", "-x", str(cdb), *options], SHOW_ENVIRONMENT, host="::", environment=BASE
    )
    try:
        assert b"WHO=v4 rule\0" in fetch(server.port, "127.0.0.1")
        assert fetch(server.port, "::1") == b""  # no IPv4 rule applies to ::1: the default denies
    finally:
        server.stop()


def test_ipv4_only_options_with_an_ipv6_literal_are_refused() -> None:
    process = launch(OUR_SERVER.command, ["-4", "::1", "0", "true"], environment=BASE)
    _out, err = process.communicate(timeout=10)
    assert (process.returncode, err) == (111, b"tcpserver: fatal: no IP address for ::1\n")


RULES = (
    "::1:allow,WHO=\"exact ::1\"\n"
    "2001:db8::/32:deny\n"
    "127.0.0.0/8:allow,WHO=\"127/8\"\n"
    ":deny\n"
)


@pytest.mark.parametrize(
    ("options", "client", "who"),
    [
        pytest.param([], "::1", b"exact ::1", id="ipv6-exact"),
        pytest.param([], "127.0.0.1", b"127/8", id="v4-mapped-cidr"),
        pytest.param(["-6"], "127.0.0.1", b"127/8", id="v4-mapped-cidr-minus-6"),
    ],
)
def test_ipv6_and_cidr_rules_apply_to_the_clients_they_name(
    tmp_path: Path, options: list[str], client: str, who: bytes
) -> None:
    cdb = rules_cdb(tmp_path, RULES, tcprules=OUR_TCPRULES)
    server = start_server(
        OUR_SERVER.command, ["-HRl0", "-x", str(cdb), *options], SHOW_ENVIRONMENT, host="::", environment=BASE
    )
    try:
        assert b"\0WHO=" + who + b"\0" in fetch(server.port, client)
    finally:
        server.stop()


_NETNS_CLIENT = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
with socket.socket(family) as s:
    s.settimeout(5)
    s.connect((sys.argv[1], int(sys.argv[2])))
    data = b""
    while chunk := s.recv(65536):
        data += chunk
sys.stdout.buffer.write(data)
"""


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, timeout=10)


@pytest.fixture
def bindv6only_namespace() -> Iterator[str]:
    """A network namespace of the test's own whose IPv6 sockets default to IPv6 only."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    namespace = f"ucspi-v6only{os.getpid() % 100000}"
    try:
        _ip("netns", "add", namespace)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"ip netns add refused here: {error.stderr.decode(errors='replace').strip()}")
    try:
        _ip("-n", namespace, "link", "set", "lo", "up")
        subprocess.run(
            ["ip", "netns", "exec", namespace, "sysctl", "-qw", "net.ipv6.bindv6only=1"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip
        yield namespace
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def test_dual_stack_socket_takes_ipv4_clients_where_the_system_default_is_ipv6_only(
    bindv6only_namespace: str,
) -> None:
    in_namespace = ["ip", "netns", "exec", bindv6only_namespace]
    server = subprocess.Popen(
        [*in_namespace, str(OUR_SERVER.command), "-1", "-HRl0", "::", "0", "sh", "-c", "echo $PROTO $TCPREMOTEIP"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip().decode()
        assert port.isdigit(), server.stderr.read() if server.stderr else b""
        client = [*in_namespace, sys.executable, "-c", _NETNS_CLIENT]
        replies = [
            subprocess.run([*client, ip, port], capture_output=True, timeout=20, check=True).stdout
            for ip in ("127.0.0.1", "::1")
        ]
    finally:
        server.terminate()
        server.wait(10)
    assert replies == [b"TCP 127.0.0.1\n", b"TCP6 ::1\n"]
