"""Faults the server survives, injected for real into a running tcpserver (issue 5, item 3).

Descriptors exhausted, a program that cannot be run, the cdb replaced while clients come in, an
identd or a DNS server that misbehaves, clients gone before the banner, a thousand programs ending
together, SIGTERM under load. Each test ends by checking the server is still whole: alive, every
slot given back, no warning it should not have written.
"""

from __future__ import annotations

import fcntl
import os
import re
import resource
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from fakes import FakeDNS, FakeIdentd, fresh_loopback
from serverproc import (
    OUR_SERVER,
    OUR_TCPRULES,
    connect,
    plain_environment,
    read_line,
    read_to_eof,
    rules_cdb,
    start_server,
    talk,
)
from serverstate import (
    children,
    cpu_seconds,
    descriptors,
    in_threads,
    more_descriptors,
    rss_kib,
    settled_descriptors,
    wait_idle,
    warnings,
)

from ucspi.rules.compile import compile_rules

ECHO_SERVED = ["/bin/echo", "served"]
# For clients that may be gone: the program's stderr is the server's, where echo's "write error"
# would land in the middle of a log line.
QUIET_ECHO_SERVED = ["/bin/sh", "-c", "exec echo served 2>/dev/null"]


# ---------------------------------------------------------------- descriptors exhausted


def test_no_descriptor_left_the_server_waits_without_spinning_then_serves_everyone() -> None:
    """accept fails with EMFILE: the listener leaves the poll set for a moment instead of spinning
    (a readable listener is readable again at once), and every waiting client is served once
    descriptors are back."""
    clients = 40
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "-b", "128"], ECHO_SERVED) as server:
        used = settled_descriptors(server)
        lowest_free = min(set(range(len(used) + 1)) - used)
        # Every descriptor below the limit is taken: no accept can succeed.
        # The soft limit only: raising a hard limit again takes CAP_SYS_RESOURCE.
        _, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        before = len(server.log())
        sockets = [connect(server.port) for _ in range(clients)]  # the kernel queues them
        try:
            began = cpu_seconds(server.pid)
            time.sleep(1.5)
            spent = cpu_seconds(server.pid) - began
            assert spent < 0.3, f"{spent:.2f} s of CPU in 1.5 s: accept is spinning"
            assert server.log()[before:] == []
            assert server.alive()
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (1024, hard))
            replies = [read_to_eof(client, timeout=10) for client in sockets]
        finally:
            for client in sockets:
                client.close()
        assert replies == [b"served\n"] * clients
        server.wait_for_log(r"^tcpserver: end \d+ status 0$", count=clients, timeout=10)
        wait_idle(server, 40)
        assert warnings(server) == []


def test_one_descriptor_to_spare_every_client_is_served_between_failed_accepts() -> None:
    """One free descriptor: a connection holds it until its program is spawned, the accepts made
    meanwhile fail with EMFILE and are retried after the back-off; nobody is lost."""
    clients = 60
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "-b", "128", "-c", "100"], ECHO_SERVED) as server:
        used = settled_descriptors(server, 100)
        lowest_free = min(set(range(len(used) + 1)) - used)
        _, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (lowest_free + 1, hard))
        replies = in_threads(clients, lambda _: talk(server.port, timeout=20))
        assert replies == [b"served\n"] * clients
        server.wait_for_log(r"^tcpserver: end \d+ status 0$", count=clients, timeout=10)
        wait_idle(server, 100)
        assert warnings(server) == []
        assert descriptors(server.pid) == used


# ---------------------------------------------------------------- the program cannot be run


@pytest.mark.parametrize(
    ("make", "error"),
    [
        ("missing", b"file does not exist"),
        ("not executable", b"access denied"),
        ("a directory", b"access denied"),
    ],
)
def test_a_program_that_cannot_be_run_drops_every_client_and_nothing_else(
    tmp_path: Path, make: str, error: bytes
) -> None:
    program = tmp_path / "program"
    if make == "not executable":
        program.write_text("#!/bin/sh\necho ran\n")
        program.chmod(0o644)
    elif make == "a directory":
        program.mkdir()
    clients = 50
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "-b", "128"], [os.fspath(program)]) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        replies = in_threads(clients, lambda _: talk(server.port, timeout=20))
        assert replies == [b""] * clients
        server.wait_for_log(r"dropping connection", count=clients)
        wait_idle(server, 40)
        expected = b"tcpserver: warning: dropping connection, unable to run %s: %s" % (os.fsencode(program), error)
        assert warnings(server) == [expected] * clients
        assert server.alive()


# ---------------------------------------------------------------- the cdb replaced while clients come in

_GENERATION = re.compile(rb"(?:^|\x00)GENERATION=(\d+)\x00")
_FILLER = "".join(f'10.{n}.:allow,FILLER="{"x" * 50}"\n=host{n}.example.com:deny\n' for n in range(300))


def _rules_text(generation: int) -> bytes:
    # The client's rule sits among 600 others, so the file is bigger than one read and a reader
    # that saw half an old file and half a new one would find nothing or garbage.
    return (_FILLER + f'127.0.0.1:allow,GENERATION="{generation}"\n:deny\n').encode()


def _replace_in_process(cdb: Path, generation: int) -> None:
    """tcprules' own code (tmp written, flushed, renamed over the cdb), without its interpreter start."""
    read_end, write_end = os.pipe()
    try:
        text = _rules_text(generation)
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
        os.write(write_end, text)
        os.close(write_end)
        write_end = -1
        compile_rules(read_end, os.fsencode(cdb), os.fsencode(cdb) + b".tmp")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_cdb_replaced_a_thousand_times_while_clients_come_in(tmp_path: Path) -> None:
    """Each client sees the rules before a replacement or after it, never an error: no drop line,
    one GENERATION per client, and never an older one than its previous connection saw."""
    replacements = 1000
    by_command = 10  # the last ones by bin/tcprules itself
    cdb = rules_cdb(tmp_path, _rules_text(0), tcprules=OUR_TCPRULES)
    writing = threading.Event()
    writing.set()
    seen: list[list[int]] = [[] for _ in range(4)]

    def client(index: int) -> int:
        # Bounded: stops when the writer is done, or after 3,000 connections.
        for _ in range(3000):
            if not writing.is_set():
                break
            reply = talk(server.port, timeout=10)
            found = _GENERATION.findall(reply)
            assert len(found) == 1, reply
            seen[index].append(int(found[0]))
        return len(seen[index])

    with start_server(
        OUR_SERVER.command, ["-v", "-HRl0", "-x", os.fspath(cdb)], ["/bin/cat", "/proc/self/environ"]
    ) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        threads = [threading.Thread(target=client, args=(index,)) for index in range(len(seen))]
        for thread in threads:
            thread.start()
        try:
            for generation in range(1, replacements - by_command + 1):
                _replace_in_process(cdb, generation)
            for generation in range(replacements - by_command + 1, replacements + 1):
                rules_cdb(tmp_path, _rules_text(generation), tcprules=OUR_TCPRULES)
        finally:
            time.sleep(0.2)
            writing.clear()
            for thread in threads:
                thread.join(30)
        wait_idle(server, 40)
        assert warnings(server) == []
        assert not [line for line in server.log() if line.startswith(b"tcpserver: deny")]
    connections = sum(len(generations) for generations in seen)
    assert connections >= 200, connections
    for generations in seen:
        assert generations == sorted(generations), "a client saw older rules after newer ones"
    assert max(max(generations) for generations in seen) == replacements
    # The clients saw many different files, not one cached early.
    assert len({generation for generations in seen for generation in generations}) >= 50


# ---------------------------------------------------------------- a misbehaving identd


@pytest.mark.parametrize("mode", ["silent", "flood", "garbage", "close"])
def test_a_misbehaving_identd_delays_a_client_at_most_the_time_limit(mode: str) -> None:
    ip = fresh_loopback()
    timeout = 2
    # The flood has no newline and no colon: only the time limit ends it.
    with FakeIdentd(ip, mode=mode) as identd:  # type: ignore[arg-type]
        with start_server(
            OUR_SERVER.command, ["-v", "-Hl0", f"-t{timeout}"], ["/bin/sh", "-c", 'echo "${TCPREMOTEINFO-unset}"']
        ) as server:
            server.wait_for_log(r"^tcpserver: status: 0/40$")
            began = time.monotonic()
            replies = in_threads(5, lambda _: talk(server.port, source=ip, timeout=timeout + 5))
            took = time.monotonic() - began
            wait_idle(server, 40)
            assert warnings(server) == []
            rss = rss_kib(server.pid)
    assert len(identd.requests) == 5
    assert took < timeout + 1.5, took
    for reply in replies:
        # Garbage may hold a newline after three colons: then it is an answer like any other.
        assert reply == b"unset\n" or mode == "garbage", reply
        assert isinstance(reply, bytes) and reply.endswith(b"\n")
    if mode == "flood":
        assert identd.flooded > 1 << 20  # the server did read a flood
        assert rss < 100 * 1024  # and did not keep it


# ---------------------------------------------------------------- a misbehaving DNS server


def test_a_silent_dns_server_holds_only_its_clients_and_they_are_served_once_it_answers() -> None:
    """The lookups wait (the first recursive round is 3 s); the server keeps accepting meanwhile."""
    ip = fresh_loopback()
    environment = plain_environment({b"DNSCACHEIP": ip.encode()})
    program = ["/bin/sh", "-c", 'echo "${TCPREMOTEHOST-unset}"']
    with FakeDNS(ip, mode="silent", ptr={ip: "client.example.com."}) as dns:
        with start_server(OUR_SERVER.command, ["-v", "-R", "-l0"], program, environment=environment) as server:
            server.wait_for_log(r"^tcpserver: status: 0/40$")
            results: list[object] = []
            runner = threading.Thread(
                target=lambda: results.extend(in_threads(10, lambda _: talk(server.port, source=ip, timeout=10), 20))
            )
            began = time.monotonic()
            runner.start()
            server.wait_for_log(r"^tcpserver: status: 10/40$")
            time.sleep(1)
            assert not [line for line in server.log() if line.startswith(b"tcpserver: ok")]
            dns.mode = "answer"
            runner.join(20)
            took = time.monotonic() - began
            wait_idle(server, 40)
            assert warnings(server) == []
    assert results == [b"client.example.com\n"] * 10
    assert 2.5 < took < 6, took


def _nonsense_replies(query: bytes) -> list[bytes]:
    """Replies with our id and question, so they are read (not ignored as foreign), whose answers
    are broken. (Foreign and garbled replies are ignored, as silence is: see the test above.)"""
    header = query[:2] + b"\x81\x80\x00\x01"
    question = query[12:]
    record = header + b"\x00\x01\x00\x00\x00\x00" + question + b"\xc0\x0c"
    ptr = record + b"\x00\x0c\x00\x01\x00\x00\x00\x3c"
    itself = 0xC000 | (len(ptr) + 2)
    return [
        record,  # a record cut after its name
        ptr + b"\x00\x10\xc0",  # rdata announced longer than the packet
        ptr + b"\x00\x02" + itself.to_bytes(2, "big"),  # a name that points at itself
        header + b"\xff\xff\x00\x00\x00\x00" + question,  # 65,535 answers announced, none there
        ptr + b"\x00\x05\x3f" + b"\x01" * 4,  # a label running past the end
    ]


class _NonsenseDNS:
    """A UDP server on (ip, 53) answering query number n with the n-th broken reply, round robin."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 53))
        self.sock.settimeout(0.05)
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            replies = _nonsense_replies(query)
            self.sock.sendto(replies[self.answered % len(replies)], client)
            self.answered += 1

    def __enter__(self) -> _NonsenseDNS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_dns_answers_that_make_no_sense_leave_the_names_unset_at_once() -> None:
    ip = fresh_loopback()
    environment = plain_environment({b"DNSCACHEIP": ip.encode()})
    program = ["/bin/sh", "-c", 'echo "${TCPREMOTEHOST-unset} ${TCPLOCALHOST-unset}"']
    clients = 3 * len(_nonsense_replies(b"\x00" * 12))
    with _NonsenseDNS(ip) as dns:
        # -p too: a PTR that did parse is checked with an A query, which gets nonsense as well.
        with start_server(OUR_SERVER.command, ["-v", "-R", "-p"], program, environment=environment) as server:
            server.wait_for_log(r"^tcpserver: status: 0/40$")
            began = time.monotonic()
            replies = in_threads(clients, lambda _: talk(server.port, source=ip, timeout=10), 20)
            took = time.monotonic() - began
            wait_idle(server, 40)
            assert warnings(server) == []
            assert server.alive()
    assert replies == [b"unset unset\n"] * clients
    assert dns.answered >= 2 * clients
    assert took < 2, took


# ---------------------------------------------------------------- clients gone before the banner


def test_clients_that_reset_before_the_banner_cost_nothing() -> None:
    """SO_LINGER 0 and close right after connect: the client is gone (RST) before a 100 KB banner
    is out. Each is dropped or served into the void; the server stays whole."""
    banner = b"B" * 100_000
    resets = 300
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "-b", "512", b"-B" + banner], QUIET_ECHO_SERVED) as server:
        used = settled_descriptors(server)
        before = len(server.log())
        for _ in range(resets):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.connect(("127.0.0.1", server.port))
            client.close()
        # Every connection taken is given back (two status lines), as a drop or as a program's end.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            log = server.log()[before:]
            taken = len([line for line in log if re.match(rb"^tcpserver: status: \d+/40$", line)])
            dropped = len([line for line in log if b"unable to print banner" in line])
            ended = len([line for line in log if line.startswith(b"tcpserver: end ")])
            if dropped + ended == resets and taken == 2 * resets and log[-1] == b"tcpserver: status: 0/40":
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"{resets} resets, {dropped} dropped, {ended} ended, {taken} status lines")
        for line in warnings(server):
            assert re.match(rb"^tcpserver: warning: dropping connection, unable to print banner: ", line), line
        assert talk(server.port, timeout=10) == banner + b"served\n"
        assert descriptors(server.pid) == used
        assert server.alive()


# ---------------------------------------------------------------- a thousand programs end together


def test_a_thousand_programs_ending_together_are_all_reaped_and_logged(tmp_path: Path) -> None:
    """1,000 programs wait on one lock the test holds; released, they end within moments of each
    other (SIGCHLDs merge): every one gets its end line, none is left a zombie, the count is 0."""
    count = 1000
    gate = tmp_path / "gate"
    gate.touch()
    with more_descriptors(count + 256), open(gate, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        options = ["-v", "-HRl0", "-c", str(count), "-b", "1024"]
        program = ["/usr/bin/flock", "-s", os.fspath(gate), "/bin/echo", "done"]
        clients: list[socket.socket] = []
        with start_server(OUR_SERVER.command, options, program) as server:
            try:
                server.wait_for_log(rf"^tcpserver: status: 0/{count}$")
                clients = [connect(server.port, timeout=30) for _ in range(count)]
                server.wait_for_log(rf"^tcpserver: status: {count}/{count}$", timeout=30)
                # Every program is running and none has ended: all wait at the gate.
                deadline = time.monotonic() + 20
                while len(children(server.pid)) < count and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert len(children(server.pid)) == count
                assert not [line for line in server.log() if line.startswith(b"tcpserver: end ")]
                fcntl.flock(held, fcntl.LOCK_UN)
                replies = [read_to_eof(client, timeout=30) for client in clients]
                ends = server.wait_for_log(r"^tcpserver: end \d+ status 0$", count=count, timeout=30)
                wait_idle(server, count)
                assert children(server.pid) == []  # no zombie: every child reaped
                assert len({line.split()[2] for line in ends}) == count
                assert replies == [b"done\n"] * count
                assert warnings(server) == []
            finally:
                for client in clients:
                    client.close()


# ---------------------------------------------------------------- SIGTERM under load


def test_sigterm_under_load_exits_0_at_once_and_running_programs_carry_on() -> None:
    program = ["/bin/sh", "-c", "echo started; read line; echo finished $line"]
    held_count = 20
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "-c", "100", "-b", "256"], program) as server:
        server.wait_for_log(r"^tcpserver: status: 0/100$")
        held = [connect(server.port) for _ in range(held_count)]
        try:
            assert [read_line(client) for client in held] == [b"started\n"] * held_count
            running = [pid for pid, _ in children(server.pid)]
            assert len(running) == held_count
            load_stop = threading.Event()
            load_served = [0] * 4

            def load(index: int) -> None:
                # New clients keep coming until the server is gone (bounded by count and by time).
                for _ in range(5000):
                    if load_stop.is_set():
                        return
                    try:
                        if talk(server.port, b"x\n", timeout=5) == b"started\nfinished x\n":
                            load_served[index] += 1
                    except OSError:
                        if not server.alive():
                            return

            threads = [threading.Thread(target=load, args=(index,)) for index in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(1)
            began = time.monotonic()
            server.signal(signal.SIGTERM)
            code = server.process.wait(5)
            took = time.monotonic() - began
            load_stop.set()
            for thread in threads:
                thread.join(10)
            assert code == 0
            assert took < 1, took
            assert sum(load_served) > 20  # it was under load
            # The programs it had started run on, each to its own end.
            for client in held:
                client.sendall(b"after\n")
            assert [read_to_eof(client) for client in held] == [b"finished after\n"] * held_count
            with pytest.raises(ConnectionRefusedError):
                talk(server.port, timeout=2)
            assert not [line for line in server.log() if b"warning" in line or b"Traceback" in line]
        finally:
            for client in held:
                client.close()


def test_lookups_that_no_descriptor_can_ever_reach_give_up_and_the_client_is_served() -> None:
    """One spare descriptor goes to the connection, and nothing the server holds can be given
    back: the lookups wait for a descriptor (ucspi/server/descriptors.py), then give up when none
    can come (1 s), so those lookups fail (names and info unset) instead of the server hanging."""
    ip = fresh_loopback()
    environment = plain_environment({b"DNSCACHEIP": ip.encode()})
    program = ["/bin/sh", "-c", 'echo "${TCPREMOTEHOST-unset} ${TCPREMOTEINFO-unset}"']
    with (
        FakeDNS(ip, ptr={ip: "client.example.com.", "127.0.0.1": "local.example.com."}),
        FakeIdentd(ip, reply=b"1 , 2 : USERID : UNIX : joe\r\n"),
        start_server(OUR_SERVER.command, ["-v", "-t2"], program, environment=environment) as server,
    ):
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        assert talk(server.port, source=ip) == b"client.example.com joe\n"
        wait_idle(server, 40)
        used = descriptors(server.pid)
        lowest_free = min(set(range(len(used) + 1)) - used)
        _, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (lowest_free + 1, hard))
        # One at a time (one descriptor), each after its wait: about 1 s a client.
        replies = in_threads(20, lambda _: talk(server.port, source=ip, timeout=60), timeout=90)
        assert replies == [b"unset unset\n"] * 20
        wait_idle(server, 40)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (1024, hard))
        assert talk(server.port, source=ip) == b"client.example.com joe\n"
        wait_idle(server, 40)
        assert warnings(server) == []
