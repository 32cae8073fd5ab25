"""The stub resolver: name escaping and server lists alone, then lookups against FakeDNS under uvloop.

Spec 6.8 and 9 item 11, 16; the retry schedule is djbdns dns_transmit.c's, shrunk for the tests.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.name
import dns.rrset
import pytest
import uvloop
from fakes import FakeDNS, fresh_loopback
from hypothesis import given
from hypothesis import strategies as st

from ucspi.server.dns import (
    StubResolver,
    labels_from_printable,
    literal_ip4s,
    parse_dnscacheip,
    parse_resolv_conf,
    printable_name,
)

T = TypeVar("T")

# The shape of (1, 3, 11, 45) at a fraction of the time: recursive lookups use the last three.
FAST = (0.05, 0.1, 0.3, 0.5)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coroutine)


@pytest.fixture
def loopback_ip() -> str:
    """This test's own 127.0.0.N (DNS's port is fixed, so tests cannot share an address)."""
    return fresh_loopback()


def resolver(*servers: str, timeouts: tuple[float, ...] = FAST) -> StubResolver:
    return StubResolver(servers, timeouts=timeouts, tcp_timeout=1)


# ---------------------------------------------------------------- printable names


def labels_of(text: str) -> tuple[bytes, ...]:
    return dns.name.from_text(text).labels[:-1]


@pytest.mark.parametrize(
    ("labels", "printable"),
    [
        (labels_of("Weird%Name:x.Example.COM"), rb"weird\045name\072x.example.com"),
        (labels_of("mail-1_a.example.com"), b"mail-1_a.example.com"),
        ((), b"."),
        ((b"a.b", b"c"), rb"a\056b.c"),
        ((b"\xff\x00 \\", b"Z"), rb"\377\000\040\134.z"),
        ((b"@[]~`{",), rb"\100\133\135\176\140\173"),
    ],
)
def test_printable_name(labels: tuple[bytes, ...], printable: bytes) -> None:
    assert printable_name(labels) == printable


label_bytes = st.binary(min_size=1, max_size=63)
# ASCII letters only: printable_name lower-cases nothing else.
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


@given(st.lists(label_bytes, min_size=1, max_size=3))
def test_printable_name_reads_back_lower_cased(labels: list[bytes]) -> None:
    lowered = tuple(label.translate(_LOWER) for label in labels)
    assert labels_from_printable(printable_name(labels)) == lowered


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        (b"a.b", (b"a", b"b")),
        (b"..a..b.", (b"a", b"b")),
        (b"", ()),
        (rb"a\.b", (b"a.b",)),
        (rb"\1\12\123\1234", (b"\x01\x0a\x53\x534",)),
        (rb"\777", (b"\xff",)),
        (b"a\\", (b"a",)),
    ],
)
def test_labels_from_printable(text: bytes, labels: tuple[bytes, ...]) -> None:
    assert labels_from_printable(text) == labels


def test_labels_from_printable_limits() -> None:
    assert labels_from_printable(b"x" * 63) == (b"x" * 63,)
    assert labels_from_printable(b"x" * 64) is None
    assert labels_from_printable(b".".join([b"x" * 63] * 3 + [b"x" * 61])) is not None  # 255 on the wire
    assert labels_from_printable(b".".join([b"x" * 63] * 3 + [b"x" * 62])) is None


@pytest.mark.parametrize(
    ("name", "addresses"),
    [
        (b"1.2.3.4", ["1.2.3.4"]),
        (b"[1.2.3.4]", ["1.2.3.4"]),
        (b"1.2.3.4.5.6.7.8", ["1.2.3.4", "5.6.7.8"]),
        (b"1.2.3", []),
        (b"1.2.3.4.5", ["1.2.3.4"]),
        (b"", []),
        (b"256.1.1.300", ["0.1.1.44"]),
        (b"1..2", []),
        (b"host.example.com", None),
        (b"1.2.3.4x", None),
    ],
)
def test_literal_ip4s(name: bytes, addresses: list[str] | None) -> None:
    assert literal_ip4s(name) == addresses


# ---------------------------------------------------------------- which servers


@pytest.mark.parametrize(
    ("value", "servers"),
    [
        (b"127.0.0.53", ["127.0.0.53"]),
        (b"10.0.0.1.10.0.0.2", ["10.0.0.1", "10.0.0.2"]),
        (b"10.0.0.1..10.0.0.2.", ["10.0.0.1", "10.0.0.2"]),
        (b"10.0.0.1 10.0.0.2", ["10.0.0.1"]),
        (b"10.0.0.1,10.0.0.2", ["10.0.0.1"]),
        (b"1.2.3", []),
        (b"", []),
        (b"::1", []),
        (b"1.2.3.256", ["1.2.3.0"]),
        (b".".join([b"1.1.1.%d" % n for n in range(20)]), [f"1.1.1.{n}" for n in range(16)]),
    ],
)
def test_parse_dnscacheip(value: bytes, servers: list[str]) -> None:
    assert parse_dnscacheip(value) == servers


def test_parse_resolv_conf() -> None:
    text = (
        b"# comment\nsearch example.com\nnameserver 10.0.0.1\nnameserver\t \t10.0.0.2 # x\n"
        b" nameserver 10.0.0.3\nnameserver ::1\nnameserver 0.0.0.0\nnameserver 10.0.0.4.5\nnameserver10.0.0.6\n"
        b"nameserver 10.0.0.7"
    )
    assert parse_resolv_conf(text) == ["10.0.0.1", "10.0.0.2", "127.0.0.1", "10.0.0.4", "10.0.0.7"]


def test_from_environment_prefers_dnscacheip(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_bytes(b"nameserver 10.9.9.9\n")
    assert StubResolver.from_environment({b"DNSCACHEIP": b"10.0.0.1.10.0.0.2"}, resolv_conf=str(conf)).servers == (
        "10.0.0.1",
        "10.0.0.2",
    )
    # Set but unparsable (or empty) falls through to resolv.conf, as dns_rcip.c does.
    assert StubResolver.from_environment({b"DNSCACHEIP": b"x"}, resolv_conf=str(conf)).servers == ("10.9.9.9",)
    assert StubResolver.from_environment({b"DNSCACHEIP": b""}, resolv_conf=str(conf)).servers == ("10.9.9.9",)
    assert StubResolver.from_environment({}, resolv_conf=str(conf)).servers == ("10.9.9.9",)


def test_from_environment_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    assert StubResolver.from_environment({}, resolv_conf=str(conf)).servers == ("127.0.0.1",)
    conf.write_bytes(b"search example.com\nnameserver ::1\n")
    assert StubResolver.from_environment({}, resolv_conf=str(conf)).servers == ("127.0.0.1",)
    # A resolv.conf that is there but unreadable fails every lookup instead.
    broken = StubResolver.from_environment({}, resolv_conf=str(tmp_path))
    assert broken.servers == ()
    assert run(broken.name_of("127.0.0.1")) is None


def test_zero_servers_are_skipped() -> None:
    assert StubResolver(["0.0.0.0", "10.0.0.1"]).servers == ("10.0.0.1",)
    assert StubResolver.from_environment({b"DNSCACHEIP": b"0.0.0.0"}).servers == ()


# ---------------------------------------------------------------- PTR against the fake


def test_ptr_is_lower_cased_and_escaped(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, ptr={"10.1.2.3": "Weird%Name:x.Example.COM"}) as server:
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) == rb"weird\045name\072x.example.com"
    assert [(r.transport, r.qname, r.rdtype) for r in server.requests] == [("udp", "3.2.1.10.in-addr.arpa.", "PTR")]
    assert not server.errors


def test_ptr_with_raw_bytes(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, ptr={"10.1.2.3": (b"a.b", b"\xff\x00", b"Com")}):
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) == rb"a\056b.\377\000.com"


def test_first_ptr_wins(loopback_ip: str) -> None:
    server = FakeDNS(loopback_ip)
    server.add_ptr("10.1.2.3", "first.example")
    server.add_ptr("10.1.2.3", "second.example")
    with server:
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) == b"first.example"


def test_ptr_to_the_root_is_a_dot(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, ptr={"10.1.2.3": "."}):
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) == b"."


def test_ptr_of_ipv6(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, ptr={"2001:db8::1": "Six.Example"}) as server:
        assert run(resolver(loopback_ip).name_of("2001:db8::1")) == b"six.example"
    assert server.requests[0].qname.endswith(".8.b.d.0.1.0.0.2.ip6.arpa.")


def test_nxdomain_is_no_name_and_no_retry(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, mode="nxdomain") as server:
        started = time.monotonic()
        assert run(resolver(loopback_ip, timeouts=(1, 3, 11, 45)).name_of("10.1.2.3")) is None
    assert time.monotonic() - started < 1
    assert len(server.requests) == 1


def test_name_not_in_table_is_no_name(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, ptr={"10.9.9.9": "other.example"}):
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) is None


def test_silent_server_runs_the_whole_schedule(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, mode="silent") as server:
        started = time.monotonic()
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) is None
        elapsed = time.monotonic() - started
    # Recursive queries start at the second timeout (dns_resolve): 0.1 + 0.3 + 0.5.
    assert 0.85 < elapsed < 1.6
    assert len(server.requests) == 3
    assert len({r.query_id for r in server.requests}) >= 2  # a fresh id for every send


def test_every_round_tries_every_server() -> None:
    first, second = fresh_loopback(), fresh_loopback()
    with FakeDNS(first, mode="silent") as one, FakeDNS(second, mode="silent") as two:
        started = time.monotonic()
        assert run(resolver(first, second).name_of("10.1.2.3")) is None
        elapsed = time.monotonic() - started
    arrivals = [(r.at, "one") for r in one.requests] + [(r.at, "two") for r in two.requests]
    order = [server for _, server in sorted(arrivals)]
    assert order == ["one", "two"] * 3
    assert 1.7 < elapsed < 2.8


def test_servfail_moves_to_the_next_server() -> None:
    first, second = fresh_loopback(), fresh_loopback()
    with (
        FakeDNS(first, mode="servfail") as failing,
        FakeDNS(second, ptr={"10.1.2.3": "ok.example"}) as answering,
    ):
        started = time.monotonic()
        assert run(resolver(first, second, timeouts=(1, 3, 11, 45)).name_of("10.1.2.3")) == b"ok.example"
    assert time.monotonic() - started < 1
    assert len(failing.requests) == 1 and len(answering.requests) == 1


@pytest.mark.parametrize("mode", ["nonsense", "wrong-id"])
def test_foreign_replies_are_ignored(loopback_ip: str, mode: str) -> None:
    # A reply that is not for our query does not end the wait: the round runs out as if silent.
    with FakeDNS(loopback_ip, mode=mode, ptr={"10.1.2.3": "x.example"}) as server:  # type: ignore[arg-type]
        started = time.monotonic()
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) is None
    assert time.monotonic() - started > 0.85
    assert len(server.requests) == 3


def test_a_forged_answer_from_another_address_is_ignored(loopback_ip: str) -> None:
    """Right id, right question, another source: the connected socket never delivers it."""
    forger_ip = fresh_loopback()

    async def lookup_while_forging(server: FakeDNS) -> bytes | None:
        # A round far longer than the fake's delay: one query, however loaded the machine.
        lookup = asyncio.create_task(resolver(loopback_ip, timeouts=(1, 3, 11, 45)).name_of("10.1.2.3"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:
            forger.bind((forger_ip, 53))
            while not server.requests:
                await asyncio.sleep(0.005)
            request = server.requests[0]
            query = dns.message.make_query(request.qname, request.rdtype, use_edns=False)
            query.id = request.query_id
            forged = dns.message.make_response(query)
            forged.answer.append(dns.rrset.from_text(request.qname, 60, "IN", "PTR", "forged.example."))
            for _ in range(50):
                forger.sendto(forged.to_wire(), request.client)
        return await lookup

    with FakeDNS(loopback_ip, ptr={"10.1.2.3": "real.example."}, delay=0.1) as server:
        assert run(lookup_while_forging(server)) == b"real.example"
    assert len(server.requests) == 1


def test_refused_port_waits_only_the_patient_round(loopback_ip: str) -> None:
    # ICMP refusals end rounds at once, except the 11 s one, which dns_transmit waits out:
    # with nothing on port 53 a real lookup takes about 11 s (docs/behaviour.md §6.8: ~22 s for two lookups).
    started = time.monotonic()
    assert run(resolver(loopback_ip, timeouts=(0.05, 5, 0.5, 5)).name_of("10.1.2.3")) is None
    assert 0.45 < time.monotonic() - started < 1.5


def test_truncated_reply_is_asked_again_over_tcp(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, mode="truncate", ptr={"10.1.2.3": "Big.Example"}) as server:
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) == b"big.example"
    assert [r.transport for r in server.requests] == ["udp", "tcp"]


def test_tcp_starts_again_from_the_first_server() -> None:
    first, second = fresh_loopback(), fresh_loopback()
    with (
        FakeDNS(first, mode="silent", ptr={"10.1.2.3": "one.example"}) as one,
        FakeDNS(second, mode="truncate", ptr={"10.1.2.3": "two.example"}) as two,
    ):
        # One UDP round times out on the first server, the second truncates, TCP goes to the first.
        one_answers_tcp = run(_switch_mode_then_lookup(one, first, second))
    assert one_answers_tcp == b"one.example"
    assert [r.transport for r in one.requests] == ["udp", "tcp"]
    assert [r.transport for r in two.requests] == ["udp"]


async def _switch_mode_then_lookup(one: FakeDNS, first: str, second: str) -> bytes | None:
    lookup = asyncio.create_task(resolver(first, second).name_of("10.1.2.3"))
    await asyncio.sleep(0.05)
    one.mode = "answer"  # the UDP query already went unanswered; TCP gets an answer
    return await lookup


def test_tcp_failure_fails_the_lookup(loopback_ip: str) -> None:
    # Truncated over UDP, then nothing listening over TCP: no return to UDP, the lookup fails.
    with FakeDNS(loopback_ip, mode="truncate", tcp=False) as server:
        assert run(resolver(loopback_ip).name_of("10.1.2.3")) is None
    assert [r.transport for r in server.requests] == ["udp"]


def test_dnscacheip_reaches_the_fake(loopback_ip: str) -> None:
    environ = {b"DNSCACHEIP": loopback_ip.encode()}
    with FakeDNS(loopback_ip, ptr={"10.1.2.3": "env.example"}):
        assert run(StubResolver.from_environment(environ, timeouts=FAST).name_of("10.1.2.3")) == b"env.example"


# ---------------------------------------------------------------- A and AAAA


def test_addresses_of(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, a={"host.example.com": ["10.0.0.1", "10.0.0.2"]}) as server:
        assert run(resolver(loopback_ip).addresses_of(b"Host.Example.com")) == ["10.0.0.1", "10.0.0.2"]
    assert [(r.qname.lower(), r.rdtype) for r in server.requests] == [("host.example.com.", "A")]


def test_addresses_of_an_escaped_name(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, a={"weird%name.example": ["10.0.0.3"]}) as server:
        assert run(resolver(loopback_ip).addresses_of(rb"weird\045name.example")) == ["10.0.0.3"]
    assert server.requests[0].qname == "weird%name.example."


def test_addresses_of_unknown_name_is_empty(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip):
        assert run(resolver(loopback_ip).addresses_of(b"nowhere.example")) == []


def test_addresses_of_a_dotted_quad_asks_nobody(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip) as server:
        assert run(resolver(loopback_ip).addresses_of(b"10.1.2.3")) == ["10.1.2.3"]
    assert server.requests == []


def test_addresses_of_fails_quietly(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, mode="nonsense"):
        assert run(resolver(loopback_ip, timeouts=(0.05, 0.05, 0.05, 0.05)).addresses_of(b"x.example")) == []
    assert run(resolver(loopback_ip).addresses_of(b"x" * 64)) == []


def test_addresses6_of(loopback_ip: str) -> None:
    with FakeDNS(loopback_ip, aaaa={"six.example": ["2001:db8::1"]}, a={"six.example": ["10.0.0.6"]}):
        assert run(resolver(loopback_ip).addresses6_of(b"six.example")) == ["2001:db8::1"]
        assert run(resolver(loopback_ip).addresses_of(b"six.example")) == ["10.0.0.6"]


# ---------------------------------------------------------------- concurrency


def test_a_slow_lookup_does_not_block_others() -> None:
    slow_ip, fast_ip = fresh_loopback(), fresh_loopback()

    async def scenario() -> tuple[float, bytes | None, bytes | None, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        slow = asyncio.create_task(resolver(slow_ip).name_of("10.1.2.3"))
        fast = await resolver(fast_ip).name_of("10.1.2.3")
        fast_time = time.monotonic() - started
        assert not slow.done()
        slow_name = await slow
        ticking.cancel()
        return fast_time, fast, slow_name, ticks

    with FakeDNS(slow_ip, mode="silent"), FakeDNS(fast_ip, ptr={"10.1.2.3": "fast.example"}):
        fast_time, fast, slow, ticks = run(scenario())
    assert fast == b"fast.example" and fast_time < 0.3
    assert slow is None
    assert ticks >= 30  # the loop kept turning through the ~0.9 s of the slow lookup
