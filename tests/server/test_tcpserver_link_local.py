"""-I and TCP6INTERFACE: a link-local IPv6 listener, reached over a veth pair between two
network namespaces of the test's own (issue 6). Needs root and `ip netns`; skipped otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from serverproc import OUR_SERVER

SERVER_ADDRESS = "fe80::1"
CLIENT_ADDRESS = "fe80::2"


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, str, str]]:
    """(server namespace, client namespace, server interface, client interface), veth-linked."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    tag = f"{os.getpid() % 100000}"
    server_ns, client_ns = f"ucspi-s{tag}", f"ucspi-c{tag}"
    server_if, client_if = f"us{tag}", f"uc{tag}"
    try:
        _ip("netns", "add", server_ns)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"ip netns add refused here: {error.stderr.decode(errors='replace').strip()}")
    try:
        _ip("netns", "add", client_ns)
        _ip("-n", server_ns, "link", "add", server_if, "type", "veth", "peer", "name", client_if, "netns", client_ns)
        # nodad: the addresses are usable at once, with no duplicate-address-detection wait.
        _ip("-n", server_ns, "addr", "add", f"{SERVER_ADDRESS}/64", "dev", server_if, "nodad")
        _ip("-n", client_ns, "addr", "add", f"{CLIENT_ADDRESS}/64", "dev", client_if, "nodad")
        for namespace, interface in ((server_ns, server_if), (client_ns, client_if)):
            _ip("-n", namespace, "link", "set", interface, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield server_ns, client_ns, server_if, client_if
    finally:
        for namespace in (server_ns, client_ns):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


CLIENT = """
import socket, sys
address = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), socket.AF_INET6, socket.SOCK_STREAM)[0][4]
with socket.socket(socket.AF_INET6) as s:
    s.settimeout(5)
    s.connect(address)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
sys.stdout.buffer.write(data)
"""


def test_link_local_listener_with_minus_i_sets_tcp6interface(namespaces: tuple[str, str, str, str]) -> None:
    server_ns, client_ns, server_if, client_if = namespaces
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, str(OUR_SERVER.command), "-1", "-HRl0", "-I", server_if,
         SERVER_ADDRESS, "0", "sh", "-c", "env | grep -E '^(PROTO|TCP)' | sort"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip().decode()
        assert port.isdigit(), server.stderr.read() if server.stderr else b""
        reply = subprocess.run(
            ["ip", "netns", "exec", client_ns, "python3", "-c", CLIENT, f"{SERVER_ADDRESS}%{client_if}", port],
            capture_output=True,
            timeout=20,
            check=True,
        ).stdout
    finally:
        server.terminate()
        server.wait(10)
    variables = dict(line.split("=", 1) for line in reply.decode().splitlines())
    assert variables["PROTO"] == "TCP6"
    assert variables["TCP6INTERFACE"] == server_if
    assert variables["TCPLOCALIP"] == variables["TCP6LOCALIP"] == SERVER_ADDRESS
    assert variables["TCPREMOTEIP"] == variables["TCP6REMOTEIP"] == CLIENT_ADDRESS
