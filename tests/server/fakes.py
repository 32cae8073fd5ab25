"""Loopback fakes of a DNS server and an identd, for tests of the lookups and of tcpserver end to end.

DNS and ident use fixed ports (53, 113), so each test takes its own 127.0.0.N from
fresh_loopback() and the fakes listen there. Each fake is a context manager: it binds and starts
a background thread on enter, and stops and joins it on exit. What the fakes were asked is kept in
their `requests` list.

Test modules here import this file as `fakes` (pytest puts tests/server on sys.path) and call
fresh_loopback() themselves or wrap it in a module fixture. There is deliberately no
tests/server/conftest.py: a second module named `conftest` would shadow tests/conftest.py for
the `from conftest import ...` of the modules in this folder.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.reversename
import dns.rrset

# Every wait in the fakes is bounded by this poll interval or by an explicit limit.
_POLL = 0.05
# Thousands of clients may knock at once (tests of descriptor shortage): none may wait for a SYN retry.
_BACKLOG = 4096
# Thousands of queries may arrive in one burst; the kernel caps this at net.core.rmem_max.
_UDP_RECEIVE_BUFFER = 4 << 20
# Wrong-id datagrams sent to one client before the next client's turn, and at most one slice per
# client in this interval: 32,000 datagrams a second, which the original's children drain in time.
_JUNK_SLICE = 32
_JUNK_SLICE_INTERVAL = 0.001

_loopback_lock = threading.Lock()
_loopback_next = 20


def _port_free(ip: str, port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError:
            return False
    return True


def fresh_loopback() -> str:
    """A 127.0.0.N (then 127.0.1.N...) not used before in this process, with ports 53 and 113 free.

    The probe skips addresses another test run on the machine is using at the same time.
    """
    global _loopback_next
    with _loopback_lock:
        while _loopback_next < 20 + 250 * 8:
            block, host = divmod(_loopback_next - 20, 250)
            _loopback_next += 1
            ip = f"127.0.{block}.{host + (20 if block == 0 else 1)}"
            if all(
                _port_free(ip, port, kind)
                for port, kind in ((53, socket.SOCK_DGRAM), (53, socket.SOCK_STREAM), (113, socket.SOCK_STREAM))
            ):
                return ip
    raise RuntimeError("no free loopback address left for fakes")


def _listener(ip: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # TIME_WAIT leftovers of an earlier test on this address must not block the bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Fake:
    """A background thread around a selector, with start-on-enter and stop-and-join-on-exit."""

    name = "fake"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.errors: list[BaseException] = []

    def _open(self) -> None:
        raise NotImplementedError

    def _serve_once(self, selector: selectors.BaseSelector) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Fake:
        self._open()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for worker in self._workers:
            worker.join(5)
        for sock in self._sockets:
            sock.close()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in self._sockets:
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                try:
                    self._serve_once(selector)
                except Exception as error:  # a fake must not die silently mid-test: record it
                    self.errors.append(error)

    def _start_worker(self, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as error:
                self.errors.append(error)

        self._workers = [worker for worker in self._workers if worker.is_alive()]
        worker = threading.Thread(target=guarded, name=f"{self.name}-conn", daemon=True)
        self._workers.append(worker)
        worker.start()


# ---------------------------------------------------------------- DNS


@dataclass(frozen=True)
class DNSRequest:
    transport: Literal["udp", "tcp"]
    qname: str  # dnspython text form, with the trailing dot
    rdtype: str  # "PTR", "A", ...
    query_id: int
    at: float  # time.monotonic() on arrival
    client: tuple = ()  # where the query came from (UDP)


DNSMode = Literal["answer", "nxdomain", "servfail", "silent", "nonsense", "wrong-id", "truncate"]

# A PTR target: text (dnspython syntax) or raw labels, for bytes text cannot carry.
PTRTarget = str | Sequence[bytes]


class FakeDNS(_Fake):
    """A recursive server's face on (ip, 53), UDP and TCP, answering from a small table.

    Modes: "answer" (the table; names not in it get NXDOMAIN), "nxdomain", "servfail", "silent"
    (reads and never answers), "nonsense" (random bytes), "wrong-id" (a correct answer with another
    id), "truncate" (UDP replies only set TC; TCP answers from the table). `mode` may be changed
    while running; `delay` holds every reply back that many seconds from its query's arrival
    (replies to queries that came together leave together); `junk_before_answer` sends that many
    copies of each UDP reply with wrong ids, from the same address, just before it (the junk of
    replies due together goes out interleaved, a slice for each in turn, as from a server answering
    them all at once); tcp=False leaves port 53/tcp closed.
    """

    name = "fake-dns"

    def __init__(
        self,
        ip: str,
        *,
        mode: DNSMode = "answer",
        ptr: Mapping[str, PTRTarget] | None = None,
        a: Mapping[str, Iterable[str]] | None = None,
        aaaa: Mapping[str, Iterable[str]] | None = None,
        delay: float = 0.0,
        junk_before_answer: int = 0,
        tcp: bool = True,
        port: int = 53,
    ) -> None:
        super().__init__()
        self.ip = ip
        self.port = port
        self.tcp = tcp
        self.mode: DNSMode = mode
        self.delay = delay
        self.junk_before_answer = junk_before_answer
        self.junk_sent = 0
        self.requests: list[DNSRequest] = []
        # UDP replies held back by `delay`: (when due, arrival order, reply, client).
        self._due: list[tuple[float, int, bytes, tuple]] = []
        self._arrivals = itertools.count()
        # Replies whose junk is going out: [reply, client, wrong ids sent so far, next slice at].
        self._junk_in_progress: list[list] = []
        self._table: dict[tuple[dns.name.Name, int], list[dns.rdata.Rdata]] = {}
        self._random = random.Random(53)
        for address, target in (ptr or {}).items():
            self.add_ptr(address, target)
        for name, addresses in (a or {}).items():
            self.add_a(name, *addresses)
        for name, addresses in (aaaa or {}).items():
            self.add_aaaa(name, *addresses)

    def add_ptr(self, address: str, target: PTRTarget) -> None:
        if isinstance(target, str):
            name = dns.name.from_text(target)
        else:
            name = dns.name.Name((*target, b""))
        rdata = dns.rdtypes.ANY.PTR.PTR(dns.rdataclass.IN, dns.rdatatype.PTR, name)
        self._table.setdefault((dns.reversename.from_address(address), dns.rdatatype.PTR), []).append(rdata)

    def add_a(self, name: str, *addresses: str) -> None:
        records = self._table.setdefault((dns.name.from_text(name), dns.rdatatype.A), [])
        records += [dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, ip) for ip in addresses]

    def add_aaaa(self, name: str, *addresses: str) -> None:
        records = self._table.setdefault((dns.name.from_text(name), dns.rdatatype.AAAA), [])
        records += [dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, ip) for ip in addresses]

    def _open(self) -> None:
        udp = socket.socket(socket.AF_INET6 if ":" in self.ip else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RECEIVE_BUFFER)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UDP_RECEIVE_BUFFER)
            udp.bind((self.ip, self.port))
            udp.setblocking(False)
            self._udp = udp
            self._sockets = [udp]
            if self.tcp:
                self._sockets.append(_listener(self.ip, self.port))
        except BaseException:
            udp.close()
            raise

    def _serve_once(self, selector: selectors.BaseSelector) -> None:
        due = [self._due[0][0]] if self._due else []
        due += [job[3] for job in self._junk_in_progress]
        wait = min(_POLL, max(0.0, min(due) - time.monotonic())) if due else _POLL
        for key, _ in selector.select(wait):
            if key.fileobj is self._udp:
                # Everything queued, so a burst of queries does not wait for one select each.
                for _ in range(1000):
                    try:
                        query, client = self._udp.recvfrom(65535)
                    except OSError:
                        break
                    reply = self._reply(query, "udp", client)
                    if reply is not None:
                        heapq.heappush(self._due, (time.monotonic() + self.delay, next(self._arrivals), reply, client))
            else:
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                self._start_worker(lambda conn=conn: self._serve_tcp(conn))
        while self._due and self._due[0][0] <= time.monotonic():
            _, _, reply, client = heapq.heappop(self._due)
            if self.junk_before_answer and len(reply) >= 2:
                self._junk_in_progress.append([reply, client, 0, 0.0])
            else:
                self._send_udp(reply, client)
        now = time.monotonic()
        for job in [job for job in self._junk_in_progress if job[3] <= now]:
            job[3] = now + _JUNK_SLICE_INTERVAL
            if self._send_junk_slice(job):
                self._junk_in_progress.remove(job)
                self._send_udp(job[0], job[1])

    def _send_junk_slice(self, job: list) -> bool:
        """The next few wrong-id copies of a reply; True once all of them went out."""
        reply, client, sent, _ = job
        right_id, body = int.from_bytes(reply[:2], "big"), reply[2:]
        stop = min(sent + _JUNK_SLICE, self.junk_before_answer)
        send = self._udp.sendto
        for number in range(sent + 1, stop + 1):
            try:
                send(((right_id + number) % 65536).to_bytes(2, "big") + body, client)
            except OSError:
                continue  # a full send buffer: that piece of junk is lost, as on a real network
        self.junk_sent += stop - sent
        job[2] = stop
        return stop >= self.junk_before_answer

    def _send_udp(self, reply: bytes, client: tuple) -> None:
        try:
            self._udp.sendto(reply, client)
        except OSError as error:
            self.errors.append(error)

    def _hold(self) -> bool:
        """Wait out `delay` in a TCP worker, unless the fake is stopped meanwhile."""
        return not self._stop.wait(self.delay) if self.delay > 0 else True

    def _serve_tcp(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            try:
                length = int.from_bytes(_recv_exactly(conn, 2), "big")
                query = _recv_exactly(conn, length)
            except (OSError, EOFError):
                return
            reply = self._reply(query, "tcp")
            if reply is None:
                # Silent over TCP: keep the connection open until the client gives up or the fake stops.
                while not self._stop.wait(_POLL):
                    pass
                return
            if self._hold():
                try:
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
                except OSError:
                    pass

    def _reply(self, wire: bytes, transport: Literal["udp", "tcp"], client: tuple = ()) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
            question = query.question[0]
        except Exception:
            return None
        self.requests.append(
            DNSRequest(
                transport,
                question.name.to_text(),
                dns.rdatatype.to_text(question.rdtype),
                query.id,
                time.monotonic(),
                client,
            )
        )
        mode = self.mode
        if mode == "silent":
            return None
        if mode == "nonsense":
            return bytes(self._random.randrange(256) for _ in range(40))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if mode == "nxdomain":
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif mode == "truncate" and transport == "udp":
            response.flags |= dns.flags.TC
        else:
            records = self._table.get((question.name, question.rdtype))
            if records:
                response.answer.append(dns.rrset.from_rdata_list(question.name, 60, records))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
        if mode == "wrong-id":
            response.id = (query.id + 1) % 65536
        # dnspython shuffles records by default; tests of "the first answer" need table order.
        return response.to_wire(want_shuffle=False)


@dataclass
class _IdentExchange:
    conn: socket.socket
    client: tuple[str, int]
    deadline: float  # for the request line, as the threaded modes' 5 s
    line: bytearray = field(default_factory=bytearray)
    reply: bytes = b""


def _recv_exactly(conn: socket.socket, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = conn.recv(length - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------- ident


@dataclass(frozen=True)
class IdentRequest:
    client: tuple[str, int]  # where the query came from: tcpserver binds it to the connection's local IP
    line: bytes  # the request as received, up to and including "\n" when one came


IdentMode = Literal["reply", "silent", "close", "flood", "garbage"]


class FakeIdentd(_Fake):
    """An identd on (ip, 113).

    Modes: "reply" (send `reply` after the request line, `delay` seconds after it came, then close;
    `reply` may be bytes or a function of the request line), "silent" (read the request, say
    nothing, hold the connection until the fake stops), "close" (close at once, unread), "flood"
    (send `flood_prefix` then bytes with no newline until the client leaves or `flood_limit` bytes went out), "garbage"
    (read the request, send `garbage_size` random bytes, close). "reply" is served by the fake's
    own selector, without a thread per connection, so thousands of clients at once cost little.
    """

    name = "fake-identd"

    def __init__(
        self,
        ip: str,
        *,
        mode: IdentMode = "reply",
        reply: bytes | Callable[[bytes], bytes] = b"",
        flood_prefix: bytes = b"",
        flood_limit: int = 64 << 20,
        garbage_size: int = 4096,
        delay: float = 0.0,
        port: int = 113,
    ) -> None:
        super().__init__()
        self.ip = ip
        self.port = port
        self.mode: IdentMode = mode
        self.reply = reply
        self.delay = delay
        self.flood_prefix = flood_prefix
        self.flood_limit = flood_limit
        self.garbage_size = garbage_size
        self.requests: list[IdentRequest] = []
        self.flooded = 0
        self._random = random.Random(113)
        # "reply" connections: reading their request, then waiting for their reply to be due.
        self._reading: dict[socket.socket, _IdentExchange] = {}
        self._due: list[tuple[float, int, _IdentExchange]] = []
        self._arrivals = itertools.count()

    def _open(self) -> None:
        self._listen = _listener(self.ip, self.port)
        self._sockets = [self._listen]

    def stop(self) -> None:
        super().stop()
        for exchange in [*self._reading.values(), *(due[2] for due in self._due)]:
            exchange.conn.close()
        self._reading.clear()
        self._due.clear()

    def _serve_once(self, selector: selectors.BaseSelector) -> None:
        wait = _POLL if not self._due else min(_POLL, max(0.0, self._due[0][0] - time.monotonic()))
        for key, _ in selector.select(wait):
            if key.fileobj is self._listen:
                self._accept_all(selector)
            else:
                self._read_request_part(selector, key.data)
        now = time.monotonic()
        for exchange in [exchange for exchange in self._reading.values() if exchange.deadline <= now]:
            self._request_complete(selector, exchange)
        while self._due and self._due[0][0] <= now:
            self._send_reply(heapq.heappop(self._due)[2])

    def _accept_all(self, selector: selectors.BaseSelector) -> None:
        for _ in range(_BACKLOG):
            try:
                conn, client = self._listen.accept()
            except OSError:
                return
            if self.mode == "close":
                self.requests.append(IdentRequest(client[:2], b""))
                conn.close()
            elif self.mode == "reply":
                conn.setblocking(False)
                exchange = _IdentExchange(conn, client[:2], time.monotonic() + 5)
                self._reading[conn] = exchange
                selector.register(conn, selectors.EVENT_READ, exchange)
            else:
                self._start_worker(lambda conn=conn, client=client: self._serve(conn, client[:2]))

    def _read_request_part(self, selector: selectors.BaseSelector, exchange: _IdentExchange) -> None:
        try:
            chunk = exchange.conn.recv(1000)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        exchange.line += chunk
        if not chunk or b"\n" in exchange.line or len(exchange.line) >= 1000:
            self._request_complete(selector, exchange)

    def _request_complete(self, selector: selectors.BaseSelector, exchange: _IdentExchange) -> None:
        selector.unregister(exchange.conn)
        del self._reading[exchange.conn]
        line = bytes(exchange.line)
        self.requests.append(IdentRequest(exchange.client, line))
        exchange.reply = self.reply(line) if callable(self.reply) else self.reply
        heapq.heappush(self._due, (time.monotonic() + self.delay, next(self._arrivals), exchange))

    def _send_reply(self, exchange: _IdentExchange) -> None:
        with exchange.conn:
            exchange.conn.settimeout(2)
            try:
                exchange.conn.sendall(exchange.reply)
            except OSError as error:
                # The client may have given up meanwhile (its -t deadline): what the tests provoke.
                if error.errno not in (errno.EPIPE, errno.ECONNRESET, None):
                    self.errors.append(error)

    def _read_request(self, conn: socket.socket) -> bytes:
        line = bytearray()
        deadline = time.monotonic() + 5
        while b"\n" not in line and len(line) < 1000 and time.monotonic() < deadline and not self._stop.is_set():
            try:
                chunk = conn.recv(1000)
            except TimeoutError:
                continue
            if not chunk:
                break
            line += chunk
        return bytes(line)

    def _serve(self, conn: socket.socket, client: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(_POLL)
            try:
                line = self._read_request(conn)
                self.requests.append(IdentRequest(client, line))
                if self.mode == "reply":
                    reply = self.reply(line) if callable(self.reply) else self.reply
                    conn.settimeout(2)
                    conn.sendall(reply)
                elif self.mode == "silent":
                    while not self._stop.wait(_POLL):
                        pass
                elif self.mode == "garbage":
                    conn.settimeout(2)
                    conn.sendall(bytes(self._random.randrange(256) for _ in range(self.garbage_size)))
                elif self.mode == "flood":
                    self._flood(conn)
            except OSError as error:
                # The client hanging up mid-flood or mid-reply is what the tests provoke.
                if error.errno not in (errno.EPIPE, errno.ECONNRESET, None):
                    raise

    def _flood(self, conn: socket.socket) -> None:
        conn.settimeout(2)
        conn.sendall(self.flood_prefix)
        block = b"A" * 65536
        while self.flooded < self.flood_limit and not self._stop.is_set():
            try:
                self.flooded += conn.send(block)
            except TimeoutError:
                continue
