"""The PROXY header parser, pure: bytes in, a header or the reason out.

The v1 and v2 headers below are HAProxy 2.6's own, as captured.
"""

from __future__ import annotations

import struct

import pytest

from ucspi.server.options import cidr_list
from ucspi.server.proxy import (
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    TrustedPeers,
    crc32c,
    header_extent,
    parse_header,
)

HAPROXY_V1 = b"PROXY TCP4 127.0.0.1 127.0.0.1 36297 41001\r\n"
HAPROXY_V1_TCP6 = bytes.fromhex("50524f58592054435036203a3a31203a3a312035353038372034313030310d0a")
HAPROXY_V2 = bytes.fromhex("0d0a0d0a000d0a515549540a" "21" "11" "000c" "7f000001" "7f000001" "b9df" "a02a")
HAPROXY_V2_TCP6 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a" "21" "21" "0024" + "00" * 15 + "01" + "00" * 15 + "01" + "deef" "a02a"
)
HAPROXY_V2_CRC = (
    bytes.fromhex("0d0a0d0a000d0a515549540a" "21" "11" "003f" "7f000001" "7f000001" "e503" "a02b")
    + bytes.fromhex("03" "0004" "0c1a3e7d")
    + bytes.fromhex("050029")
    + b"7F000001:E503_7F000001:A02B_6B0C200B_0004"
)
HAPROXY_V2_CHECK = bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000")


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


INET_BLOCK = bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 5555, 25)


def complete(header: bytes, version: str = "any") -> ProxyHeader:
    """The header as the reader would see it: followed by the client's data, measured, parsed."""
    taken, done = header_extent(header + b"HELO client\r\n", version)
    assert (taken, done) == (len(header), True)
    return parse_header(header)


# ---- HAProxy's own bytes


def test_haproxy_v1_tcp4() -> None:
    assert complete(HAPROXY_V1) == ProxyHeader(1, ("127.0.0.1", 36297), ("127.0.0.1", 41001))


def test_haproxy_v1_tcp6() -> None:
    assert complete(HAPROXY_V1_TCP6) == ProxyHeader(1, ("::1", 55087, 0, 0), ("::1", 41001, 0, 0))


def test_haproxy_v2_inet() -> None:
    assert complete(HAPROXY_V2) == ProxyHeader(2, ("127.0.0.1", 0xB9DF), ("127.0.0.1", 0xA02A))


def test_haproxy_v2_inet6() -> None:
    assert complete(HAPROXY_V2_TCP6) == ProxyHeader(2, ("::1", 0xDEEF, 0, 0), ("::1", 0xA02A, 0, 0))


def test_haproxy_v2_crc32c_and_unique_id() -> None:
    header = complete(HAPROXY_V2_CRC)
    assert header.source == ("127.0.0.1", 0xE503)
    assert header.variables == ((b"PROXY_UNIQUE_ID", b"7F000001:E503_7F000001:A02B_6B0C200B_0004"),)


def test_haproxy_v2_health_check_is_local() -> None:
    header = complete(HAPROXY_V2_CHECK)
    assert header.local and header.destination is None


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720's check value


# ---- v1


def test_v1_unknown_is_15_bytes_and_the_rest_of_its_line_is_ignored() -> None:
    assert complete(b"PROXY UNKNOWN\r\n").local
    assert complete(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n").local


@pytest.mark.parametrize("cut", range(1, len(HAPROXY_V1)))
def test_v1_prefix_is_all_header_and_incomplete(cut: int) -> None:
    assert header_extent(HAPROXY_V1[:cut]) == (cut, False)


def test_v1_longest_line_is_accepted() -> None:
    full = "ffff:" * 7 + "ffff"
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert complete(line).source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 0, 0)


def test_v1_canonical_ipv6_and_v4_mapped() -> None:
    header = complete(b"PROXY TCP6 2001:DB8:0:0::1 ::ffff:192.0.2.7 1 2\r\n")
    assert header.source == ("2001:db8::1", 1, 0, 0)
    assert header.destination == ("::ffff:192.0.2.7", 2, 0, 0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"P" * 107, b"not a PROXY header"),
        (b"PROXY " + b"1" * 101, b"no CRLF within 107 bytes"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", b"bare LF in v1 line"),
        (b"PROXY UNKNOWN\n", b"bare LF in v1 line"),
        (b"\n", b"not a PROXY header"),
        (b"HELO x\r\n", b"not a PROXY header"),
        (b"GET / HTTP/1.0\r\n", b"not a PROXY header"),
    ],
)
def test_v1_refused_while_measuring(data: bytes, reason: bytes) -> None:
    with pytest.raises(ProxyError) as refused:
        header_extent(data)
    assert refused.value.reason == reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", b"bad port in v1 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", b"bad port in v1 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 999999\r\n", b"bad port in v1 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", b"bad port in v1 line"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", b"bad address in v1 line"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", b"bad address in v1 line"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", b"bad address in v1 line"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", b"bad address in v1 line"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", b"bad v1 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", b"bad v1 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r2\r\n", b"bad v1 line"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", b"bad v1 family"),
        (b"PROXY \r\n", b"bad v1 family"),
    ],
)
def test_v1_refused_when_parsed(line: bytes, reason: bytes) -> None:
    with pytest.raises(ProxyError) as refused:
        complete(line)
    assert refused.value.reason == reason


def test_v1_only_refuses_v2_and_v2_only_refuses_v1() -> None:
    with pytest.raises(ProxyError, match="v1"):
        header_extent(HAPROXY_V2, "v1")
    with pytest.raises(ProxyError, match="v2"):
        header_extent(HAPROXY_V1, "v2")
    assert header_extent(HAPROXY_V1, "v1") == (len(HAPROXY_V1), True)
    assert header_extent(HAPROXY_V2, "v2") == (len(HAPROXY_V2), True)


# ---- v2


@pytest.mark.parametrize("cut", range(1, len(HAPROXY_V2_CRC)))
def test_v2_prefix_is_all_header_and_incomplete(cut: int) -> None:
    assert header_extent(HAPROXY_V2_CRC[:cut]) == (cut, False)


def test_v2_local_with_a_body_skips_exactly_the_body() -> None:
    header = v2(0x0, 0x11, INET_BLOCK + tlv(0xE0, b"x" * 40))
    assert complete(header).local


@pytest.mark.parametrize("family", [0x00, 0x12, 0x22, 0x31, 0x32, 0x10])
def test_v2_unspec_udp_unix_fall_back_to_the_real_endpoints(family: int) -> None:
    block = {0: 0, 1: 12, 2: 36, 3: 216}[family >> 4]
    assert complete(v2(0x1, family, b"\x01" * block)).local


def test_v2_tlvs_of_interest_and_unknown_ones_skipped() -> None:
    ssl = tlv(0x20, b"\x07" + b"\x00" * 4 + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example") + tlv(0x23, b"AES"))
    body = INET_BLOCK + tlv(0x04, b"\x00" * 9) + tlv(0x02, b"mx.example.org") + ssl + tlv(0xEE, b"\x00x")
    header = complete(v2(0x1, 0x11, body))
    assert header.source == ("192.0.2.7", 5555)
    assert header.destination == ("198.51.100.1", 25)
    assert dict(header.variables) == {
        b"SSL_TLS_SNI_SERVERNAME": b"mx.example.org",
        b"SSL_PROTOCOL": b"TLSv1.3",
        b"SSL_PEER_CERT_CN": b"client.example",
        b"SSL_CIPHER": b"AES",
    }


def test_v2_ssl_sub_tlvs_count_only_over_tls() -> None:
    ssl = tlv(0x20, b"\x00" + b"\x00" * 4 + tlv(0x21, b"TLSv1.3"))
    assert complete(v2(0x1, 0x11, INET_BLOCK + ssl)).variables == ()


def test_v2_values_with_a_nul_or_too_long_are_dropped_not_fatal() -> None:
    body = INET_BLOCK + tlv(0x02, b"a\x00b") + tlv(0x05, b"u" * 129) + tlv(0x05, b"u" * 128)
    header = complete(v2(0x1, 0x11, body))
    assert header.variables == ((b"PROXY_UNIQUE_ID", b"u" * 128),)
    assert header.dropped == (b"SSL_TLS_SNI_SERVERNAME", b"PROXY_UNIQUE_ID")
    long_name = complete(v2(0x1, 0x11, INET_BLOCK + tlv(0x02, b"n" * 256)))
    assert long_name.dropped == (b"SSL_TLS_SNI_SERVERNAME",)


def test_v2_crc32c_computed_here_verifies() -> None:
    body = INET_BLOCK + tlv(0x03, b"\x00" * 4)
    unsigned = v2(0x1, 0x11, body)
    signed = unsigned[:-4] + crc32c(unsigned).to_bytes(4, "big")
    assert complete(signed).source == ("192.0.2.7", 5555)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (HAPROXY_V2_CRC[:31] + bytes([HAPROXY_V2_CRC[31] ^ 1]) + HAPROXY_V2_CRC[32:], b"bad CRC32C"),
        (v2(0x1, 0x11, INET_BLOCK + tlv(0x03, b"\x00" * 3)), b"bad CRC32C TLV"),
        (v2(0x1, 0x11, INET_BLOCK + b"\x02\x00\x09abc"), b"TLV past the end"),
        (v2(0x1, 0x11, INET_BLOCK + b"\x02\x00"), b"TLV past the end"),
        (v2(0x1, 0x11, INET_BLOCK + tlv(0x20, b"\x01\x00\x00\x00\x00\x21\x00\x05ab")), b"TLV past the end"),
        (v2(0x1, 0x11, INET_BLOCK[:11]), b"v2 address block too short"),
        (v2(0x1, 0x21, INET_BLOCK), b"v2 address block too short"),
        (v2(0x2, 0x11, INET_BLOCK), b"bad v2 command"),
        (v2(0x1, 0x41, INET_BLOCK), b"bad v2 family"),
        (v2(0x1, 0x13, INET_BLOCK), b"bad v2 family"),
    ],
)
def test_v2_refused_when_parsed(header: bytes, reason: bytes) -> None:
    with pytest.raises(ProxyError) as refused:
        complete(header)
    assert refused.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\r\n\r\n\x00\r\nQUIX", b"bad v2 signature"),
        (b"\r\r", b"bad v2 signature"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c", b"bad v2 version"),
        (b"\x00" * 16, b"not a PROXY header"),
    ],
)
def test_v2_refused_while_measuring(data: bytes, reason: bytes) -> None:
    with pytest.raises(ProxyError) as refused:
        header_extent(data)
    assert refused.value.reason == reason


# ---- trust


def test_trusted_peers_match_by_network_and_v4_mapped_as_ipv4() -> None:
    trusted = TrustedPeers(cidr_list("127.0.0.1/32,10.0.0.0/8,2001:db8::/32"))
    assert trusted.trusts("127.0.0.1")
    assert trusted.trusts("::ffff:127.0.0.1")
    assert trusted.trusts("10.255.0.1")
    assert trusted.trusts("2001:db8::5")
    assert not trusted.trusts("127.0.0.2")
    assert not trusted.trusts("::1")
    assert not trusted.trusts("2001:db9::5")
    assert TrustedPeers(cidr_list("0.0.0.0/0")).trusts("192.0.2.1")
    assert not TrustedPeers(cidr_list("0.0.0.0/0")).trusts("::1")
