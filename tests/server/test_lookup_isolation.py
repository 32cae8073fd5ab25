"""Lookups that keep their answers when descriptors run short or a DNS server sends junk (issue 9,
rows 4, 5, 6 and 10), side by side with the original when /usr/bin/tcpserver is installed.

Rows 4-6 at a reduced size: RLIMIT_NOFILE 128 under -c 200, 300 clients at once, an identd or a
DNS server answering after 0.5 s. The original's lookups run in each child's own descriptor table,
so every client gets its answer; ours share one table, and a lookup must wait for a descriptor
instead of failing. Row 10 at full size: 2,000 wrong-id datagrams before each DNS answer, 10
clients at once, then 3, each served with TCPREMOTEHOST within 1 s. The full-size rows 4-6 are
bench/stress_lookups.py.
"""

from __future__ import annotations

import ast
import collections
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fakes import FakeDNS, FakeIdentd, fresh_loopback
from serverproc import (
    ORIGINAL_SERVER,
    OUR_SERVER,
    TOP,
    Implementation,
    ServerProcess,
    connect,
    original_available,
    plain_environment,
    read_to_eof,
    rules_cdb,
    start_server,
    talk,
)
from serverstate import descriptors, more_descriptors, short_of_descriptors, wait_idle, warnings

IMPLEMENTATIONS = [OUR_SERVER, *([ORIGINAL_SERVER] if original_available() else [])]

DESCRIPTOR_LIMIT = 128
CONCURRENCY = 200
CLIENTS = 300
ANSWER_DELAY = 0.5
CLIENT_TIMEOUT = 15.0
IDENT_REPLY = b"1 , 2 : USERID : UNIX : slowuser\r\n"


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda implementation: implementation.name)
def implementation(request: pytest.FixtureRequest) -> Implementation:
    return request.param


def _clients_at_once(port: int, source: str, count: int, timeout: float = CLIENT_TIMEOUT) -> list[tuple[object, float]]:
    """count clients from source started together: (reply or exception, seconds) for each."""
    results: list[tuple[object, float]] = [(None, 0.0)] * count
    start = threading.Barrier(count)

    def client(index: int) -> None:
        start.wait(timeout)
        began = time.monotonic()
        try:
            reply: object = talk(port, source=source, timeout=timeout)
        except Exception as error:
            reply = error
        results[index] = (reply, time.monotonic() - began)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout * 2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "clients still running"
    return results


def _tally(results: Sequence[tuple[object, float]]) -> collections.Counter[str]:
    return collections.Counter(repr(reply) for reply, _ in results)


def _check_server_whole(implementation: Implementation, server: ServerProcess) -> None:
    assert server.alive()
    wait_idle(server, CONCURRENCY)
    if implementation is OUR_SERVER:
        assert warnings(server) == []


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    # 300 clients and the fakes' 300 connections live in this process.
    with more_descriptors(4 * CLIENTS + 256):
        yield


@pytest.mark.usefixtures("many_descriptors")
def test_row4_ident_answers_for_every_client_when_descriptors_run_short(implementation: Implementation) -> None:
    ip = fresh_loopback()
    options = ["-v", "-H", "-l", "localhost", "-r", "-c", str(CONCURRENCY), "-b", "512"]
    with (
        FakeIdentd(ip, reply=IDENT_REPLY, delay=ANSWER_DELAY) as identd,
        start_server(implementation.command, options, ["/usr/bin/printenv", "TCPREMOTEINFO"]) as server,
    ):
        short_of_descriptors(server.pid, DESCRIPTOR_LIMIT)
        results = _clients_at_once(server.port, ip, CLIENTS)
        assert _tally(results) == {repr(b"slowuser\n"): CLIENTS}, (warnings(server), identd.errors)
        _check_server_whole(implementation, server)
    assert not identd.errors


@pytest.mark.usefixtures("many_descriptors")
def test_row5_ident_rules_allow_every_client_when_descriptors_run_short(
    implementation: Implementation, tmp_path: Path
) -> None:
    ip = fresh_loopback()
    rules = rules_cdb(tmp_path, f"slowuser@{ip}:allow\n{ip}:deny\n")
    options = ["-v", "-H", "-l", "localhost", "-r", "-x", str(rules), "-c", str(CONCURRENCY), "-b", "512"]
    with (
        FakeIdentd(ip, reply=IDENT_REPLY, delay=ANSWER_DELAY) as identd,
        start_server(implementation.command, options, ["/bin/echo", "allowed"]) as server,
    ):
        short_of_descriptors(server.pid, DESCRIPTOR_LIMIT)
        results = _clients_at_once(server.port, ip, CLIENTS)
        assert _tally(results) == {repr(b"allowed\n"): CLIENTS}, (warnings(server), identd.errors)
        _check_server_whole(implementation, server)
    assert not identd.errors


@pytest.mark.usefixtures("many_descriptors")
def test_row6_dns_names_every_client_when_descriptors_run_short(implementation: Implementation) -> None:
    ip = fresh_loopback()
    environment = plain_environment({b"DNSCACHEIP": ip.encode()})
    options = ["-v", "-h", "-R", "-c", str(CONCURRENCY), "-b", "512"]
    names = {ip: "client.example.com.", "127.0.0.1": "local.example.com."}
    with (
        FakeDNS(ip, ptr=names, delay=ANSWER_DELAY) as dns,
        start_server(
            implementation.command, options, ["/usr/bin/printenv", "TCPREMOTEHOST"], environment=environment
        ) as server,
    ):
        short_of_descriptors(server.pid, DESCRIPTOR_LIMIT)
        results = _clients_at_once(server.port, ip, CLIENTS)
        assert _tally(results) == {repr(b"client.example.com\n"): CLIENTS}
        _check_server_whole(implementation, server)
    assert not dns.errors


# ---------------------------------------------------------------- one lookup, its process out of descriptors

# The lookup runs in a child whose descriptor table is full; one descriptor is closed after
# free_after seconds (never if 0), with no release() call (the gate's retry must find it). Its
# timeout (ident's -t, each DNS round) is `patience`; the gate gives up after `stuck` seconds
# without progress (0: its default). The child prints (result, seconds taken,
# starved while waiting, on_relieved called, starved at the end).
_LOOKUP_WITHOUT_DESCRIPTORS = r"""
import asyncio, os, resource, sys
import uvloop
from ucspi.server.dns import StubResolver
from ucspi.server.ident import remote_info
try:
    from ucspi.server.descriptors import DESCRIPTORS
except ImportError:  # the code before the gate: the lookup alone is observed
    DESCRIPTORS = None
ip, kind, free_after, patience, stuck = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6])

async def main():
    loop = asyncio.get_running_loop()
    relieved = []
    if DESCRIPTORS is not None:
        DESCRIPTORS.on_relieved = lambda: relieved.append(loop.time())
        DESCRIPTORS.stuck_seconds = stuck or DESCRIPTORS.stuck_seconds
    if kind == "ident":
        lookup = remote_info(ip, 1, ip, 2, patience)
    else:
        lookup = StubResolver([ip], timeouts=(0.05, patience, patience, patience)).name_of("10.1.2.3")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    starved = []
    loop.call_later(0.1, lambda: starved.append(DESCRIPTORS is not None and DESCRIPTORS.starved))
    if free_after:
        loop.call_later(free_after, os.close, held.pop())
    started = loop.time()
    result = await lookup
    await asyncio.sleep(0.01)
    end_starved = DESCRIPTORS is not None and DESCRIPTORS.starved
    print(repr((result, loop.time() - started, starved, bool(relieved), end_starved)))

uvloop.run(main())
"""


def _lookup_without_descriptors(
    ip: str, kind: str, free_after: float = 0.3, patience: float = 0.15, stuck: float = 5
) -> tuple:
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.fspath(TOP)}
    result = subprocess.run(
        [sys.executable, "-c", _LOOKUP_WITHOUT_DESCRIPTORS, ip, kind, str(free_after), str(patience), str(stuck)],
        capture_output=True,
        env=environment,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.decode())


def test_ident_waits_for_a_descriptor_and_its_deadline_starts_with_the_socket() -> None:
    """No descriptor for 0.3 s, a -t of 0.15 s: the lookup waits, then gets its full 0.15 s."""
    ip = fresh_loopback()
    with FakeIdentd(ip, reply=IDENT_REPLY, delay=0.1):
        info, seconds, starved, relieved, starved_at_end = _lookup_without_descriptors(ip, "ident")
    assert info == b"slowuser"
    assert 0.3 <= seconds < 1.5
    assert starved == [True] and relieved and not starved_at_end


def test_dns_waits_for_a_descriptor_and_its_round_starts_with_the_socket() -> None:
    """No descriptor for 0.3 s, rounds of 0.15 s: the lookup waits, then its first round gets the answer."""
    ip = fresh_loopback()
    with FakeDNS(ip, ptr={"10.1.2.3": "waited.example."}, delay=0.1) as dns:
        name, seconds, starved, relieved, starved_at_end = _lookup_without_descriptors(ip, "dns")
    assert name == b"waited.example"
    assert 0.3 <= seconds < 1.5
    assert starved == [True] and relieved and not starved_at_end
    assert len(dns.requests) == 1  # the wait cost no round


@pytest.mark.parametrize("kind", ["ident", "dns"])
def test_a_lookup_that_no_descriptor_can_reach_fails_instead_of_hanging(kind: str) -> None:
    """Nothing is ever freed and none of the gate's sockets is open: after STUCK_SECONDS (1 s)
    the lookup fails as it did before the gate, and the gate is no longer starved."""
    ip = fresh_loopback()
    with FakeIdentd(ip, reply=IDENT_REPLY), FakeDNS(ip, ptr={"10.1.2.3": "never.example."}):
        outcome = _lookup_without_descriptors(ip, kind, free_after=0, stuck=0)
    result, seconds, starved, relieved, starved_at_end = outcome
    assert result is None
    assert 1.0 <= seconds < 2.5
    assert starved == [True] and relieved and not starved_at_end


# Five sockets asked for with the table full, three descriptors freed and one release() called:
# the first three in line get theirs (each lets the next try), the other two are cancelled.
_GATE_IN_ORDER = r"""
import asyncio, os, resource, socket
import uvloop
from ucspi.server.descriptors import DESCRIPTORS

async def main():
    loop = asyncio.get_running_loop()
    relieved = []
    DESCRIPTORS.on_relieved = lambda: relieved.append(loop.time())
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    waiters = [asyncio.create_task(DESCRIPTORS.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(5)]
    await asyncio.sleep(0.1)
    starved_before = DESCRIPTORS.starved
    for _ in range(3):
        os.close(held.pop())
    DESCRIPTORS.released()
    await asyncio.sleep(0.01)  # less than the retry interval: the release alone passes them on
    served = [index for index, waiter in enumerate(waiters) if waiter.done()]
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await asyncio.sleep(0)
    print(repr((starved_before, served, DESCRIPTORS.starved, len(relieved))))

uvloop.run(main())
"""


def test_gate_serves_waiters_in_order_and_cancelled_ones_leave() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _GATE_IN_ORDER],
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.fspath(TOP)},
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert ast.literal_eval(result.stdout.decode()) == (True, [0, 1, 2], False, 1)


# ---------------------------------------------------------------- DNS junk


def test_row10_dns_answers_survive_junk(implementation: Implementation) -> None:
    """2,000 wrong-id datagrams from the DNS server's own address before each answer: 10 clients
    at once, then 3, each gets its name within 1 s. The fake's junk, in Python, takes most of that
    second; -l spares it the local names' share."""
    ip = fresh_loopback()
    environment = plain_environment({b"DNSCACHEIP": ip.encode()})
    options = ["-v", "-h", "-R", "-l", "local.example.com"]
    with (
        FakeDNS(ip, ptr={ip: "client.example.com."}, junk_before_answer=2000) as dns,
        start_server(
            implementation.command, options, ["/usr/bin/printenv", "TCPREMOTEHOST"], environment=environment
        ) as server,
    ):
        for count in (10, 3):
            results = _clients_at_once(server.port, ip, count)
            assert _tally(results) == {repr(b"client.example.com\n"): count}
            slowest = max(seconds for _, seconds in results)
            assert slowest < 1.0, f"{count} clients: the slowest waited {slowest:.2f} s"
        assert server.alive()
        wait_idle(server, 40)
    assert dns.junk_sent >= 2000 * 13  # the junk really went out
    assert len(dns.requests) == 13  # and no answer was lost: not one query asked again
    assert not dns.errors


# ---------------------------------------------------------------- the rules file, opened with the table full


def test_the_rules_file_waits_for_a_descriptor_instead_of_dropping_the_client(tmp_path: Path) -> None:
    """Clients waiting for their PROXY header fill the server's table (RLIMIT_NOFILE 32) before
    the rules file was ever opened; one then sends its header. The original opens the file in
    that client's own child; ours must wait for a descriptor (one more client leaves), not drop it
    with `unable to read rules.cdb: process cannot open more files`."""
    limit = 32
    rules = rules_cdb(tmp_path, "192.0.2.7:allow\n:deny\n")
    options = ["-v", "-H", "-R", "-l", "localhost", "-x", str(rules), "-c", "200", "-b", "64"]
    options.append("--proxy-from=127.0.0.1/32")
    with start_server(OUR_SERVER.command, options, ["/bin/echo", "allowed"]) as server:
        server.wait_for_log(r"^tcpserver: status: 0/200$")
        short_of_descriptors(server.pid, limit)
        idle = [connect(server.port) for _ in range(limit + 8)]
        try:
            deadline = time.monotonic() + 10
            while len(descriptors(server.pid)) < limit and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(descriptors(server.pid)) == limit, "the server's table never filled"
            headed = idle.pop(0)
            headed.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 25\r\n")
            time.sleep(0.3)  # the rules file's open meets EMFILE meanwhile
            idle.pop(0).close()  # one accepted before it leaves: a descriptor comes back
            assert read_to_eof(headed, 5.0) == b"allowed\n", warnings(server)
            headed.close()
        finally:
            for client in idle:
                client.close()
        wait_idle(server, 200)
        assert not [line for line in warnings(server) if b"rules.cdb" in line]
