"""IPv6 clients, side by side with Debian's IPv6 build (ucspi-tcp-ipv6, fefe's patch), the model
for their environment and log lines (issue 6). That package conflicts with ucspi-tcp, so .ci/run
unpacks it beside it (apt-get download, dpkg -x) into /opt/ucspi-tcp-ipv6; skipped without it.

That build listens on IPv6 and IPv4 for host `0`; ours, as 0.88, on 0.0.0.0 only, and on both
for `::` (README, differences item 3). So the build runs with `0` and ours with `::`: what a user coming
from ucspi-tcp-ipv6 writes."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from serverproc import (
    OUR_SERVER,
    OUR_TCPRULES,
    plain_environment,
    read_to_eof,
    rules_cdb,
    start_server,
)

IPV6_BUILD = Path(os.environ.get("UCSPI_IPV6_BUILD", "/opt/ucspi-tcp-ipv6/usr/bin/tcpserver"))

pytestmark = pytest.mark.skipif(
    not os.access(IPV6_BUILD, os.X_OK), reason=f"Debian's IPv6 build is not unpacked at {IPV6_BUILD}"
)

_PORT_ENTRY = re.compile(rb"^(TCP6?(?:LOCAL|REMOTE)PORT)=\d+$")
_NUMBERS = re.compile(rb"(pid|ok|deny|end) \d+")
_PORTS = re.compile(rb":\d+( |$)")


def _served(server: Path, options: list[str]) -> tuple[list[bytes], list[bytes]]:
    host = "0" if server == IPV6_BUILD else "::"
    process = start_server(
        server, ["-v", *options], ["cat", "/proc/self/environ"], host=host, environment=plain_environment()
    )
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(("::1", process.port))
            reply = read_to_eof(client)
        # The start's status line and the one after the end: the client's whole life is logged.
        process.wait_for_log(r"^tcpserver: status: 0/40$", count=2)
    finally:
        process.stop()
    entries = [_PORT_ENTRY.sub(rb"\1=PORT", entry) for entry in reply.split(b"\0")[:-1]]
    log = [_PORTS.sub(rb":PORT\1", _NUMBERS.sub(rb"\1 N", line)) for line in process.log()]
    return entries, sorted(log)


@pytest.mark.parametrize(
    "options",
    [["-HRl0"], ["-HRl", "local.name", "-B", "hello"]],
    ids=["plain", "banner-localname"],
)
def test_ipv6_client_like_debian_s_ipv6_build(options: list[str]) -> None:
    assert _served(OUR_SERVER.command, options) == _served(IPV6_BUILD, options)


def test_ipv6_rule_like_debian_s_ipv6_build(tmp_path: Path) -> None:
    cdb = rules_cdb(tmp_path, '::1:allow,WHO="v6"\n:deny\n', tcprules=OUR_TCPRULES)
    options = ["-HRl0", "-x", str(cdb)]
    ours, theirs = _served(OUR_SERVER.command, options), _served(IPV6_BUILD, options)
    assert b"WHO=v6" in ours[0]
    assert ours == theirs
