"""PROXY protocol end to end: our tcpserver behind a real HAProxy, and behind hostile senders.

HAProxy (Debian's 2.6) runs in the foreground (-db), dropping to `nobody`, with a config of
the test's own: its frontends on free ports of a fresh 127.0.0.N (and ::1), its backends our
servers on 127.0.0.1. HAProxy's backend connections come from 127.0.0.1, hence
--proxy-from=127.0.0.1/32. The clients bind 127.0.0.5 (or ::1), so the program must see them,
not HAProxy. In CI (CI=true) a missing haproxy fails instead of skipping.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from conftest import needs_tool
from fakes import FakeIdentd, fresh_loopback
from serverproc import (
    OUR_SERVER,
    OUR_TCPRULES,
    ServerProcess,
    connect,
    plain_environment,
    read_line,
    read_to_eof,
    rules_cdb,
    start_server,
)
from serverstate import wait_idle

from ucspi.server.proxy import V2_SIGNATURE, crc32c

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT = "127.0.0.5"
TRUSTED = "--proxy-from=127.0.0.1/32"
# The environment the program was given, then whatever the client sent.
SHOW = ["/bin/sh", "-c", "env; echo ---; exec cat"]
NAMES = (
    b"PROTO",
    b"TCPLOCALIP",
    b"TCPLOCALPORT",
    b"TCPREMOTEIP",
    b"TCPREMOTEPORT",
    b"TCPREMOTEINFO",
    b"TCPPROXYIP",
    b"TCPPROXYPORT",
    b"PROXY_UNIQUE_ID",
    b"SSL_TLS_SNI_SERVERNAME",
    b"SSL_CIPHER",
    b"CLIENT",
)


needs_haproxy = needs_tool(HAPROXY, "haproxy")


def shown(reply: bytes) -> tuple[dict[bytes, bytes], bytes]:
    """The program's variables of interest, and what reached it after its environment."""
    environment, _, data = reply.partition(b"---\n")
    variables = dict(line.partition(b"=")[::2] for line in environment.splitlines() if b"=" in line)
    return {name: variables[name] for name in NAMES if name in variables}, data


def exchange(port: int, data: bytes, *, host: str = "127.0.0.1", source: str | None = None) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        if source is not None:
            client.bind((source, 0))
        client.connect((host, port))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return read_to_eof(client)


def _free_port(ip: str) -> int:
    """A port free on ip and on ::1 (a frontend binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe6:
            probe6.bind(("::1", 0))
            port = probe6.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((ip, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def _bound(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, port))
        except OSError:
            return True
    return False


@contextmanager
def haproxy(directory: Path, backends: Sequence[str]) -> Iterator[tuple[str, list[int]]]:
    """HAProxy with one frontend per backend `server` line (its options after the address);
    yields the fresh 127.0.0.N and the frontends' ports, each bound there and on ::1."""
    frontend_ip = fresh_loopback()
    ports = [_free_port(frontend_ip) for _ in backends]
    sections = []
    for index, (port, server_line) in enumerate(zip(ports, backends, strict=True)):
        sections.append(
            f"frontend fe{index}\n    bind {frontend_ip}:{port}\n    bind [::1]:{port}\n"
            f"    unique-id-format %{{+X}}o\\ %ci:%cp_%fi:%fp_%Ts_%rt\n"
            f"    default_backend be{index}\n"
            f"backend be{index}\n    server s1 {server_line}\n"
        )
    config = directory / "haproxy.cfg"
    config.write_text(
        "global\n    log stderr format raw local0 info\n    nbthread 1\n    user nobody\n    group nogroup\n"
        # HAProxy 2.6's built-in HTTP client asks resolv.conf's nameserver otherwise.
        "resolvers default\n    nameserver lo 127.0.0.1:53\n"
        "defaults\n    mode tcp\n    log global\n    timeout connect 2s\n    timeout client 5s\n"
        "    timeout server 5s\n" + "".join(sections)
    )
    process = subprocess.Popen(
        [HAPROXY, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=directory
    )
    try:
        deadline = time.monotonic() + 10
        while not all(_bound(frontend_ip, port) for port in ports):
            assert process.poll() is None, process.stderr.read() if process.stderr else b""
            assert time.monotonic() < deadline, "haproxy did not bind its frontends"
            time.sleep(0.02)
        yield frontend_ip, ports
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stderr is not None:
            process.stderr.close()


@contextmanager
def ours(options: Sequence[str], program: Sequence[str] = SHOW, **kwargs: object) -> Iterator[ServerProcess]:
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", *options], program, **kwargs) as server:  # type: ignore[arg-type]
        yield server


def _rules(directory: Path) -> str:
    # HAProxy's address is denied: a program that runs shows that the rules saw the client.
    text = f'{CLIENT}:allow,CLIENT="yes"\n::1:allow,CLIENT="six"\n127.0.0.1:deny\n'
    return str(rules_cdb(directory, text, tcprules=OUR_TCPRULES))  # IPv6 rules: ours only


# ---------------------------------------------------------------- behind HAProxy


@needs_haproxy
@pytest.mark.parametrize(
    "send_proxy", ["send-proxy", "send-proxy-v2", "send-proxy-v2 proxy-v2-options crc32c,unique-id"]
)
def test_haproxy_ipv4_client_is_seen_by_program_and_rules(tmp_path: Path, send_proxy: str) -> None:
    with ours([TRUSTED, "-x", _rules(tmp_path)]) as server:
        with haproxy(tmp_path, [f"127.0.0.1:{server.port} {send_proxy}"]) as (frontend, (port,)):
            with connect(port, host=frontend, source=CLIENT) as client:
                client_port = client.getsockname()[1]
                client.sendall(b"HELO through haproxy\r\n")
                client.shutdown(socket.SHUT_WR)
                variables, data = shown(read_to_eof(client))
    assert data == b"HELO through haproxy\r\n"
    assert variables[b"PROTO"] == b"TCP"
    assert variables[b"TCPREMOTEIP"] == CLIENT.encode()
    assert variables[b"TCPREMOTEPORT"] == b"%d" % client_port
    assert (variables[b"TCPLOCALIP"], variables[b"TCPLOCALPORT"]) == (frontend.encode(), b"%d" % port)
    assert variables[b"TCPPROXYIP"] == b"127.0.0.1"
    assert variables[b"CLIENT"] == b"yes"
    assert b"TCPREMOTEINFO" not in variables
    if "unique-id" in send_proxy:
        assert variables[b"PROXY_UNIQUE_ID"].startswith(b"7F000005:%X_" % client_port)
    else:
        assert b"PROXY_UNIQUE_ID" not in variables
    assert any(line.endswith(b":%s::%d" % (CLIENT.encode(), client_port)) for line in server.log() if b" ok " in line)


@needs_haproxy
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_ipv6_client(tmp_path: Path, send_proxy: str) -> None:
    with ours([TRUSTED, "-x", _rules(tmp_path)]) as server:
        with haproxy(tmp_path, [f"127.0.0.1:{server.port} {send_proxy}"]) as (_, (port,)):
            variables, data = shown(exchange(port, b"six", host="::1"))
    assert data == b"six"
    assert variables[b"PROTO"] == b"TCP6"
    assert variables[b"TCPREMOTEIP"] == b"::1"
    assert variables[b"TCPLOCALIP"] == b"::1"
    assert variables[b"TCPLOCALPORT"] == b"%d" % port
    assert variables[b"CLIENT"] == b"six"


@needs_haproxy
@pytest.mark.parametrize("local", ["serve", "close"])
def test_haproxy_health_checks(tmp_path: Path, local: str) -> None:
    options = [TRUSTED] + (["--proxy-local=close"] if local == "close" else [])
    with ours(options) as server:
        with haproxy(tmp_path, [f"127.0.0.1:{server.port} send-proxy-v2 check inter 200ms"]):
            notes = server.wait_for_log(r"^tcpserver: proxy: local header from 127\.0\.0\.1", count=3)
        wait_idle(server, 40)
        log = server.log()
    if local == "close":
        assert notes[0] == b"tcpserver: proxy: local header from 127.0.0.1, closed"
        assert not [line for line in log if line.startswith(b"tcpserver: pid ")]
    else:
        assert notes[0] == b"tcpserver: proxy: local header from 127.0.0.1, served with the real endpoints"
        assert [line for line in log if line.startswith(b"tcpserver: pid ")]
    assert not [line for line in log if b"warning" in line]


# ---------------------------------------------------------------- hostile senders


def v2_header(source: str, destination: str, ports: tuple[int, int], tlvs: bytes = b"", command: int = 1) -> bytes:
    block = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", *ports) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(block)) + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 25\r\n"


def test_header_one_byte_at_a_time() -> None:
    with ours([TRUSTED]) as server, connect(server.port) as client:
        for byte in V1:
            client.send(bytes([byte]))
            time.sleep(0.005)
        client.sendall(b"payload")
        client.shutdown(socket.SHUT_WR)
        variables, data = shown(read_to_eof(client))
    assert (variables[b"TCPREMOTEIP"], variables[b"TCPREMOTEPORT"]) == (b"192.0.2.7", b"5555")
    assert (variables[b"TCPLOCALIP"], variables[b"TCPLOCALPORT"]) == (b"198.51.100.1", b"25")
    assert data == b"payload"


@pytest.mark.parametrize("header", [V1, v2_header("192.0.2.7", "198.51.100.1", (5555, 25))], ids=["v1", "v2"])
def test_header_and_payload_in_one_write(header: bytes) -> None:
    payload = b"P" * 3000 + b"\r\n" + V1  # a second header is the client's data
    with ours([TRUSTED]) as server:
        variables, data = shown(exchange(server.port, header + payload))
    assert variables[b"TCPREMOTEIP"] == b"192.0.2.7"
    assert data == payload


def test_unknown_then_waiting_for_the_banner() -> None:
    with ours([TRUSTED, "-B", "220 ready\r\n"]) as server, connect(server.port) as client:
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1)  # nothing before the header
        started = time.monotonic()
        client.sendall(b"PROXY UNKNOWN\r\n")
        assert read_line(client, timeout=3) == b"220 ready\r\n"
        assert time.monotonic() - started < 2
        client.shutdown(socket.SHUT_WR)
        variables, data = shown(read_to_eof(client))
    assert variables[b"TCPREMOTEIP"] == b"127.0.0.1"
    assert variables[b"TCPPROXYIP"] == b"127.0.0.1"
    assert data == b""


def test_banner_is_the_first_byte_after_the_header() -> None:
    with ours([TRUSTED, "-B", "220 ready\r\n"]) as server:
        reply = exchange(server.port, V1 + b"QUIT\r\n")
    assert reply.startswith(b"220 ready\r\n")
    variables, data = shown(reply[len(b"220 ready\r\n") :])
    assert variables[b"TCPREMOTEIP"] == b"192.0.2.7"
    assert data == b"QUIT\r\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY " + b"x" * 101, b"bad PROXY header from 127.0.0.1: no CRLF within 107 bytes"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 25\n", b"bad PROXY header from 127.0.0.1: bare LF in v1 line"),
        (b"PROXY TCP4 192.0.2.07 198.51.100.1 5555 25\r\n", b"bad PROXY header from 127.0.0.1: bad address in v1 line"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 05555 25\r\n", b"bad PROXY header from 127.0.0.1: bad port in v1 line"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 65536\r\n", b"bad PROXY header from 127.0.0.1: bad port in v1 line"),
        (
            v2_header("192.0.2.7", "198.51.100.1", (1, 2), tlv(0x03, b"\x00\x00\x00\x01")),
            b"bad PROXY header from 127.0.0.1: bad CRC32C",
        ),
        (
            v2_header("192.0.2.7", "198.51.100.1", (1, 2), b"\x02\x00\x20short"),
            b"bad PROXY header from 127.0.0.1: TLV past the end",
        ),
        (b"HELO me\r\n", b"bad PROXY header from 127.0.0.1: not a PROXY header"),
        (b"PROXY TCP4", b"unable to read PROXY header from 127.0.0.1: end of file"),
    ],
    ids=["107-no-crlf", "bare-lf", "leading-zero", "port-leading-zero", "port-65536", "bad-crc", "tlv-overrun",
         "not-proxy", "eof"],
)  # fmt: skip
def test_malformed_header_drops_with_its_reason_and_no_child(data: bytes, reason: bytes) -> None:
    with ours([TRUSTED]) as server:
        exchange(server.port, data + b"after")  # closed (or reset) with nothing sent
        line = server.wait_for_log(r"^tcpserver: warning: ")[0]
        wait_idle(server, 40)
        log = server.log()
    assert line == b"tcpserver: warning: dropping connection, " + reason
    assert not [entry for entry in log if entry.startswith(b"tcpserver: pid ")]


def test_v2_with_a_good_crc_and_tlvs_a_nul_value_dropped() -> None:
    tlvs = tlv(0x02, b"mx.example.org") + tlv(0x05, b"id\x00nul") + tlv(0x03, b"\x00" * 4)
    unsigned = v2_header("192.0.2.7", "198.51.100.1", (5555, 25), tlvs)
    signed = unsigned[:-4] + crc32c(unsigned).to_bytes(4, "big")
    with ours([TRUSTED]) as server:
        variables, data = shown(exchange(server.port, signed + b"data"))
        note = server.wait_for_log(r"^tcpserver: proxy: ")[0]
    assert variables[b"SSL_TLS_SNI_SERVERNAME"] == b"mx.example.org"
    assert b"PROXY_UNIQUE_ID" not in variables
    assert note == b"tcpserver: proxy: TLV value for PROXY_UNIQUE_ID from 127.0.0.1 dropped"
    assert data == b"data"


def test_local_header_with_a_body_is_skipped_exactly() -> None:
    local = v2_header("192.0.2.7", "198.51.100.1", (5555, 25), tlv(0xE0, b"custom"), command=0)
    with ours([TRUSTED]) as server:
        variables, data = shown(exchange(server.port, local + b"after the header"))
    assert variables[b"TCPREMOTEIP"] == b"127.0.0.1"
    assert data == b"after the header"


def test_untrusted_sender_s_header_reaches_the_program_as_data() -> None:
    with ours([TRUSTED]) as server:
        variables, data = shown(exchange(server.port, V1 + b"rest", source=CLIENT))
    assert variables[b"TCPREMOTEIP"] == CLIENT.encode()
    assert b"TCPPROXYIP" not in variables
    assert data == V1 + b"rest"


def test_silent_trusted_peers_fill_the_slots_until_the_deadline() -> None:
    with ours([TRUSTED, "--proxy-timeout=1", "-c", "2"]) as server:
        with ExitStack() as stack:
            silent = [stack.enter_context(connect(server.port)) for _ in range(2)]
            server.wait_for_log(r"^tcpserver: status: 2/2")
            started = time.monotonic()
            variables, _ = shown(exchange(server.port, b"", source=CLIENT))
            waited = time.monotonic() - started
            assert all(client.recv(1) == b"" for client in silent)  # closed, nothing sent
        drops = server.wait_for_log(r"^tcpserver: warning: ", count=2)
    assert variables[b"TCPREMOTEIP"] == CLIENT.encode()
    assert 0.7 < waited < 4
    timed_out = b"tcpserver: warning: dropping connection, unable to read PROXY header from 127.0.0.1: timed out"
    assert drops == [timed_out] * 2


def test_stale_proxy_variables_are_removed_for_every_client() -> None:
    stale = {name: b"stale" for name in (b"TCPPROXYIP", b"TCPPROXYPORT", b"SSL_CIPHER", b"PROXY_UNIQUE_ID")}
    with ours([TRUSTED], environment=plain_environment(stale)) as server:
        direct, _ = shown(exchange(server.port, b"", source=CLIENT))
        proxied, _ = shown(exchange(server.port, V1))
    assert not {b"TCPPROXYIP", b"TCPPROXYPORT", b"SSL_CIPHER", b"PROXY_UNIQUE_ID"} & direct.keys()
    assert proxied[b"TCPPROXYIP"] == b"127.0.0.1"
    assert not {b"SSL_CIPHER", b"PROXY_UNIQUE_ID"} & proxied.keys()


def test_a_rule_overrides_a_tlv_variable(tmp_path: Path) -> None:
    rules = str(rules_cdb(tmp_path, '192.0.2.7:allow,SSL_TLS_SNI_SERVERNAME="from the rule"\n'))
    header = v2_header("192.0.2.7", "198.51.100.1", (5555, 25), tlv(0x02, b"from the header"))
    with ours([TRUSTED, "-x", rules]) as server:
        variables, _ = shown(exchange(server.port, header))
    assert variables[b"SSL_TLS_SNI_SERVERNAME"] == b"from the rule"


def test_per_client_limits_count_the_header_s_client() -> None:
    hold = ["/bin/sh", "-c", "echo in; exec cat >/dev/null"]
    with ours([TRUSTED, "--max-per-ip=1:busy\\r\\n"], program=hold) as server:
        with connect(server.port) as first:
            first.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 1 25\r\n")
            assert read_line(first) == b"in\n"
            other = exchange(server.port, b"PROXY TCP4 192.0.2.8 198.51.100.1 2 25\r\n")
            same = exchange(server.port, b"PROXY TCP4 192.0.2.7 198.51.100.1 3 25\r\n")
    assert other == b"in\n"
    assert same == b"busy\r\n"


def test_ident_is_not_asked_for_a_proxied_client_unless_proxy_ident() -> None:
    client_ip = fresh_loopback()
    header = f"PROXY TCP4 {client_ip} 127.0.0.1 4000 25\r\n".encode()
    with FakeIdentd(client_ip, reply=b"4000 , 25 : USERID : UNIX : alice\r\n") as identd:
        with start_server(OUR_SERVER.command, ["-Hrl0", "-t5", TRUSTED], SHOW) as server:
            without, _ = shown(exchange(server.port, header))
        assert identd.requests == []
        with start_server(OUR_SERVER.command, ["-Hrl0", "-t5", TRUSTED, "--proxy-ident"], SHOW) as server:
            asked, _ = shown(exchange(server.port, header))
    assert b"TCPREMOTEINFO" not in without
    assert asked[b"TCPREMOTEINFO"] == b"alice"


@pytest.mark.parametrize(
    "option", ["--proxy=v1", "--proxy-timeout=3", "--proxy-local=close", "--proxy-ident"]
)
def test_refinements_without_proxy_from_are_usage_errors(option: str) -> None:
    result = subprocess.run(
        [str(OUR_SERVER.command), option, "127.0.0.1", "0", "true"], capture_output=True, timeout=10, check=False
    )
    assert result.returncode == 100
    assert result.stderr == f"tcpserver: fatal: {option.partition('=')[0]} needs --proxy-from\n".encode()


@pytest.mark.parametrize("value", ["", "127.0.0.1/33", "10.0.0.1/8", "127.0.0.1/ 32", "any"])
def test_bad_proxy_from_is_a_usage_error(value: str) -> None:
    result = subprocess.run(
        [str(OUR_SERVER.command), f"--proxy-from={value}", "127.0.0.1", "0", "true"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 100
    assert result.stderr == f"tcpserver: fatal: bad value for --proxy-from: {value}\n".encode()
