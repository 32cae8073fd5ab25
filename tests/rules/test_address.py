"""ucspi.address: IP parsing, RFC 5952 text, colon prefixes, CIDR keys (docs/behaviour.md §8.1, 8.2). Pure."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucspi.address import (
    CidrError,
    address_bits,
    cidr_from_key,
    cidr_key,
    format_ipv6,
    format_network,
    normalise_ipv6_prefix,
    parse_cidr,
    parse_ipv4,
    parse_ipv6,
)

UNIT = settings.get_profile("ucspi-unit")


def v6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


# ---- parsing ----


@pytest.mark.parametrize(
    "text",
    [b"2001:db8::1", b"2001:DB8::1", b"2001:0db8:0000:0000:0000:0000:0000:0001", b"2001:db8:0:0:0:0:0:1",
     b"2001:0DB8::0:1", b"2001:db8::0.0.0.1"],
)
def test_parse_ipv6_any_spelling(text: bytes) -> None:
    assert parse_ipv6(text) == v6("2001:db8::1")


@pytest.mark.parametrize(
    "text",
    [b"", b"1.2.3.4", b"fe80::1%eth0", b"2001:db8::1::2", b"1:2:3:4:5:6:7:8:9", b"12345::", b"g::",
     b"::1 ", b" ::1", b"::ffff:1.2.3.04", b"::ffff:1.2.3", b"\xff::", b":" * 46, b"0" * 40 + b"::"],
)
def test_parse_ipv6_refuses(text: bytes) -> None:
    assert parse_ipv6(text) is None


@pytest.mark.parametrize("text", [b"1.2.3", b"1.2.3.4.5", b"01.2.3.4", b"1.2.3.256", b"1.2.3.4 ", b"::1", b"a.b.c.d"])
def test_parse_ipv4_refuses(text: bytes) -> None:
    assert parse_ipv4(text) is None


def test_parse_ipv4() -> None:
    assert parse_ipv4(b"10.0.0.255") == bytes([10, 0, 0, 255])


# ---- RFC 5952 text ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("::", b"::"),
        ("::1", b"::1"),
        ("1::", b"1::"),
        ("2001:0DB8:0000:0000:0000:0000:0000:0001", b"2001:db8::1"),  # 4.1 no leading zeros, 4.3 lower case
        ("2001:db8:0:1:1:1:1:1", b"2001:db8:0:1:1:1:1:1"),  # 4.2.2: one zero group is not "::"
        ("2001:0:0:1:0:0:0:1", b"2001:0:0:1::1"),  # 4.2.3: the longest run
        ("2001:db8:0:0:1:0:0:1", b"2001:db8::1:0:0:1"),  # 4.2.3: the first of equal runs
        ("fe80:0:0:0:0:0:0:0", b"fe80::"),
        ("0:0:0:0:0:0:0:1", b"::1"),
        ("1:2:3:4:5:6:7:8", b"1:2:3:4:5:6:7:8"),
        ("::ffff:1.2.3.4", b"::ffff:1.2.3.4"),  # 5: v4-mapped ends in a dotted quad
        ("::ffff:0:0", b"::ffff:0.0.0.0"),
        ("::1.2.3.4", b"::1.2.3.4"),  # v4-compatible, as glibc's inet_ntop writes it
        ("::ffff:0:1.2.3.4", b"::ffff:0:102:304"),  # not v4-mapped
        ("1:0:0:2:0:0:0:0", b"1:0:0:2::"),
    ],
)
def test_format_ipv6_rfc5952(text: str, expected: bytes) -> None:
    assert format_ipv6(v6(text)) == expected


_GROUP = st.one_of(st.just(0), st.just(0), st.just(0xFFFF), st.integers(0, 0xFFFF))


@UNIT
@given(st.lists(_GROUP, min_size=8, max_size=8))
def test_format_ipv6_is_glibc_inet_ntop(groups: list[int]) -> None:
    # What the server's environment shows comes from the same rules: both must agree.
    packed = b"".join(group.to_bytes(2, "big") for group in groups)
    assert format_ipv6(packed) == socket.inet_ntop(socket.AF_INET6, packed).encode()
    assert parse_ipv6(format_ipv6(packed)) == packed


# ---- colon-terminated prefixes (docs/behaviour.md §8.1) ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"2001:", b"2001:"),
        (b"2001:DB8:", b"2001:db8:"),
        (b"2001:0db8:0001:", b"2001:db8:1:"),
        (b"2001:db8::1:", b"2001:db8::1:"),
        (b"::1:", b"::1:"),
        (b"1:2:3:4:5:6:7:", b"1:2:3:4:5:6:7:"),
        (b"1:2:3::4:5:6:", b"1:2:3::4:5:6:"),
    ],
)
def test_ipv6_prefix(text: bytes, expected: bytes) -> None:
    assert normalise_ipv6_prefix(text) == expected


@pytest.mark.parametrize(
    "text",
    [b":", b"2001", b"2001:db8", b"1:2:3:4:5:6:7:8:", b"1:2:3::4:5:6:7:", b"12345:", b"2001::db8::1:", b"x:",
     b":1:", b"1.2.3.4:", b"2001:db8::"],
)
def test_ipv6_prefix_refuses(text: bytes) -> None:
    # `2001:db8::` is a whole address: the rules read it as one before trying a prefix.
    assert normalise_ipv6_prefix(text) is None


# ---- CIDR keys (docs/behaviour.md §8.2) ----


@pytest.mark.parametrize(
    ("network", "key"),
    [
        # The examples docs/behaviour.md §8.2 derives from ucspi-tcp6's source.
        (b"10.0.0.0/8", b"_0000e0g0"),
        (b"127.0.0.0/8", b"_0bcdefgh"),
        (b"192.168.0.0/16", b"_ab000000i0k0m000"),
        (b"fe80::/10", b"^`abcdef0g0"),
        (b"2002::/64", b"^00`00000000000a" + b"0" * 49),
        # The ends of the length ranges.
        (b"128.0.0.0/1", b"_a"),
        (b"255.255.255.255/32", b"_abcdefghijklmnopqrstuvwxyz123456"),
        (b"1.2.3.4/32", b"_0000000h000000o0000000wx00000400"),
        (b"8000::/1", b"^`"),
        (b"::/1", b"^0"),
        (b"::1/128", b"^" + b"0" * 127 + b"`"),
        (b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", b"^" + bytes(range(0x60, 0xE0))),
    ],
)
def test_cidr_keys(network: bytes, key: bytes) -> None:
    packed, length = parse_cidr(network)
    assert cidr_key(packed, length) == key
    assert cidr_from_key(key) == (packed, length)
    assert format_network(packed, length) == network


def test_short_ipv4_form() -> None:
    # ucspi-tcp6's short form: the octets written, then a dot.
    assert parse_cidr(b"10./8") == parse_cidr(b"10.0.0.0/8")
    assert parse_cidr(b"192.168./16") == (bytes([192, 168, 0, 0]), 16)
    assert parse_cidr(b"10.1.2./24") == (bytes([10, 1, 2, 0]), 24)
    assert parse_cidr(b"10./32") == (bytes([10, 0, 0, 0]), 32)


@pytest.mark.parametrize(
    "text",
    [
        b"10.0.0.0/0", b"10.0.0.0/33", b"::/129", b"::/0", b"10.0.0.0/08", b"10.0.0.0/", b"10.0.0.0/8x",
        b"10.0.0.0/ 8", b"10.0.0.0/-8", b"10.0.0.0/99999999999999999999",  # lengths
        b"10.1.0.0/8", b"10./4", b"2001:db8::1/32", b"::1/127",  # bits set after the prefix
        b"10/8", b"10.0/16", b"010.0.0.0/8", b"10.0.0.256/32", b"1.2.3.4./32", b"10..0.0/16", b"/8",
        b"2001:db8:/32", b"fe80::%eth0/10", b"a/b", b"1.2.3.4/8/8", b"10.0.0.0",
    ],
)
def test_parse_cidr_refuses(text: bytes) -> None:
    with pytest.raises(CidrError):
        parse_cidr(text)


@pytest.mark.parametrize(
    "key", [b"", b"_", b"^", b"x0", b"_" + b"0" * 33, b"^" + b"0" * 129, b"_b", b"^a", b"^``", b"_0 ", b"=_0"]
)
def test_cidr_from_key_refuses(key: bytes) -> None:
    assert cidr_from_key(key) is None


@UNIT
@given(st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)), st.data())
def test_cidr_keys_are_prefix_closed(packed: bytes, data: st.DataObject) -> None:
    # The lookup takes the first n characters of the whole address's key as the key of its /n.
    length = data.draw(st.integers(1, len(packed) * 8))
    bits = int.from_bytes(packed, "big")
    width = len(packed) * 8
    network = (bits >> (width - length) << (width - length)).to_bytes(len(packed), "big")
    key = cidr_key(network, length)
    assert key[1:] == address_bits(packed)[:length]
    assert cidr_from_key(key) == (network, length)
    assert len(key) == length + 1
