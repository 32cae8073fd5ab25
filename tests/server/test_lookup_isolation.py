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

import collections
import resource
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fakes import FakeDNS, FakeIdentd, fresh_loopback
from serverproc import (
    ORIGINAL_SERVER,
    OUR_SERVER,
    Implementation,
    ServerProcess,
    original_available,
    plain_environment,
    rules_cdb,
    start_server,
    talk,
)
from serverstate import more_descriptors, wait_idle, warnings

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


def _short_of_descriptors(server: ServerProcess, limit: int = DESCRIPTOR_LIMIT) -> None:
    # The soft limit only: the original's children inherit it with their fork.
    _, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit, hard))


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
        _short_of_descriptors(server)
        results = _clients_at_once(server.port, ip, CLIENTS)
        assert _tally(results) == {repr(b"slowuser\n"): CLIENTS}
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
        _short_of_descriptors(server)
        results = _clients_at_once(server.port, ip, CLIENTS)
        assert _tally(results) == {repr(b"allowed\n"): CLIENTS}
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
        _short_of_descriptors(server)
        results = _clients_at_once(server.port, ip, CLIENTS)
        assert _tally(results) == {repr(b"client.example.com\n"): CLIENTS}
        _check_server_whole(implementation, server)
    assert not dns.errors


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
