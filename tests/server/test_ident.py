"""remote_info against a fake identd on the test's own 127.0.0.N:113, under uvloop (docs/behaviour.md §6.9)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import uvloop
from fakes import FakeIdentd, fresh_loopback

from ucspi.server.ident import parse_reply, remote_info

T = TypeVar("T")


@pytest.fixture
def loopback_ip() -> str:
    """This test's own 127.0.0.N (ident's port is fixed, so tests cannot share an address)."""
    return fresh_loopback()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coroutine)


def ask(ip: str, timeout: float = 5, local_port: int = 32909, remote_port: int = 44790) -> bytes | None:
    # Client and server side share the test's address: the query leaves from local_ip, like tcpserver's.
    return run(remote_info(ip, local_port, ip, remote_port, timeout))


# ---------------------------------------------------------------- parsing alone


@pytest.mark.parametrize(
    ("reply", "info"),
    [
        (b"44790 , 32909 : USERID : UNIX :  joe user:x \r\n", b"joeuser:x"),
        (b"44790 , 32909 : ERROR : NO-USER\r\n", b""),
        (b"\n", b""),
        (b"1,2:USERID:UNIX:\tj\to\re\n trailing", b"joe"),
        (b"1,2:USERID:UNIX:" + b"u" * 300 + b"\r\n", b"u" * 257),
        (b"1,2:USERID:UNIX:" + b"u" * 257, b"u" * 257),
        (b"1,2:USERID:UNIX:" + b"u" * 256 + b"\n", b"u" * 256),
        (b"a:b:c:d:e\n", b"d:e"),
    ],
)
def test_parse_reply(reply: bytes, info: bytes) -> None:
    assert parse_reply(reply) == info


@pytest.mark.parametrize("reply", [b"", b"1,2:USERID:UNIX:joe", b"1,2:USERID:UNIX:" + b"u" * 256])
def test_parse_reply_without_newline_fails(reply: bytes) -> None:
    assert parse_reply(reply) is None


# ---------------------------------------------------------------- against the fake


def test_userid_reply_loses_its_whitespace(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, reply=b"44790 , 32909 : USERID : UNIX :  joe user:x \r\n") as identd:
        assert ask(loopback_ip) == b"joeuser:x"
    assert identd.requests[0].line == b"44790 , 32909\r\n"
    assert identd.requests[0].client[0] == loopback_ip
    assert not identd.errors


def test_reply_built_from_the_request(loopback_ip: str) -> None:
    def answer(line: bytes) -> bytes:
        return line.strip() + b" : USERID : UNIX : user-" + line.split(b",")[0].strip() + b"\r\n"

    with FakeIdentd(loopback_ip, reply=answer):
        assert ask(loopback_ip, local_port=25, remote_port=61000) == b"user-61000"


def test_query_leaves_from_the_local_ip(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, reply=b"x:y:z:who\n") as identd:
        assert run(remote_info("127.0.0.1", 1, loopback_ip, 2, 5)) == b"who"
    assert identd.requests[0].client[0] == "127.0.0.1"


def test_error_reply_is_an_empty_success(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, reply=b"44790 , 32909 : ERROR : NO-USER\r\n"):
        assert ask(loopback_ip) == b""


def test_long_reply_is_cut_at_257(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, reply=b"1 , 2 : USERID : UNIX : " + b"v" * 300 + b"\r\n"):
        assert ask(loopback_ip) == b"v" * 257


def test_closed_before_newline_fails(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, reply=b"1 , 2 : USERID : UNIX : joe"):
        assert ask(loopback_ip) is None


def test_close_at_once_fails(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, mode="close"):
        assert ask(loopback_ip) is None


def test_refused_fails_at_once(loopback_ip: str) -> None:
    started = time.monotonic()
    assert ask(loopback_ip) is None
    assert time.monotonic() - started < 1


def test_silence_times_out(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, mode="silent") as identd:
        started = time.monotonic()
        assert ask(loopback_ip, timeout=1) is None
        elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 1.5
    assert identd.requests[0].line == b"44790 , 32909\r\n"


def test_zero_timeout_does_not_even_connect(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, reply=b"a:b:c:d\n") as identd:
        assert ask(loopback_ip, timeout=0) is None
        assert ask(loopback_ip, timeout=-1) is None
    assert identd.requests == []


def test_flood_without_newline_is_bounded_by_the_deadline(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, mode="flood") as identd:
        started = time.monotonic()
        assert ask(loopback_ip, timeout=1) is None
        elapsed = time.monotonic() - started
    assert elapsed < 1.5
    assert identd.flooded > 1 << 20  # megabytes went by and were not kept
    assert not identd.errors


def test_flood_after_three_colons_stops_at_257(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, mode="flood", flood_prefix=b"1 , 2 : USERID : UNIX : "):
        started = time.monotonic()
        assert ask(loopback_ip, timeout=5) == b"A" * 257
    assert time.monotonic() - started < 1


def test_garbage_never_raises(loopback_ip: str) -> None:
    with FakeIdentd(loopback_ip, mode="garbage", garbage_size=100_000):
        info = ask(loopback_ip, timeout=2)
    assert info is None or len(info) <= 257


def test_ipv6_loopback() -> None:
    try:
        with FakeIdentd("::1", reply=b"1 , 2 : USERID : UNIX : six\r\n") as identd:
            assert run(remote_info("::1", 2, "::1", 1, 5)) == b"six"
    except OSError as error:  # ::1 missing, or port 113 on ::1 taken by a concurrent run
        pytest.skip(f"no ident fake on [::1]:113: {error}")
    assert identd.requests[0].line == b"1 , 2\r\n"


def test_unbindable_local_ip_fails_quietly(loopback_ip: str) -> None:
    # 192.0.2.1 (TEST-NET-1) is not on this machine: bind fails with EADDRNOTAVAIL.
    assert run(remote_info("192.0.2.1", 1, loopback_ip, 2, 1)) is None


def test_lookups_do_not_block_the_loop(loopback_ip: str) -> None:
    async def scenario() -> tuple[bytes | None, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        info = await remote_info(loopback_ip, 1, loopback_ip, 2, 1)
        ticking.cancel()
        return info, ticks

    with FakeIdentd(loopback_ip, mode="silent"):
        info, ticks = run(scenario())
    assert info is None
    assert ticks >= 15


def test_cancelled_lookup_closes_its_socket(loopback_ip: str) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(remote_info(loopback_ip, 1, loopback_ip, 2, 30))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(asyncio.sleep(0))  # whatever a first loop leaves behind is not ours
    before = len(os.listdir("/proc/self/fd"))
    with FakeIdentd(loopback_ip, mode="silent") as identd:
        run(scenario())
    after = len(os.listdir("/proc/self/fd"))
    assert len(identd.requests) == 1
    assert after <= before
