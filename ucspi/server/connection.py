"""One client from accept to end: its descriptor, addresses, facts, decision, program and slot.

Connection.run is the whole path of a client, top to bottom, in the original's order. What can
end a connection (a deny, a drop, a failed spawn, an internal error, the program's end) ends it
through Connection.finish, which closes the descriptor and gives the slot back, each once.

sslserver's path, when it comes, is the same with two steps moved: accept, PROXY header,
lookups, rules, limits, handshake, banner through TLS, program (under -n the program starts
after the limits, on the plain socket).

The path is a coroutine started eagerly (start_eagerly): with no banner left to send and no
lookups, it runs to its end on the accepting call's stack, without a task or a loop round trip.
Where the options leave nothing to wait for before the rules (no PROXY header, banner or
lookup), Connection.start takes the same steps without making the coroutine at all; both end
in Connection._decided (rules -> limits -> program).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import types
from collections.abc import Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any

from ucspi.errors import error_text
from ucspi.rules.database import Verdict
from ucspi.rules.lookup import NO_RULE
from ucspi.server.descriptors import DESCRIPTORS, SHORTAGE_ERRORS
from ucspi.server.limits import Refusal, Ticket
from ucspi.server.log import (
    Denied,
    Dropped,
    InternalError,
    ProgramEnded,
    Proxied,
    ProxyNoted,
    Served,
    SpawnFailed,
    rule_key,
)
from ucspi.server.peer import DIRECT, Peer, Relay
from ucspi.server.proxy import ProxyError, ProxyTimeout, read_header
from ucspi.server.spawn import ForkFailed, proxy_variables, shape_and_values, tcp_shape_and_values

if TYPE_CHECKING:
    from ucspi.server.loop import Server

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_NO_RULE_VERDICT: Verdict = (NO_RULE, False, ())
_PROXY_TIMEOUT = 5.0  # seconds, when --proxy-timeout is not given (Postfix's default; the spec: >= 3)


class Drop(Exception):
    """An expected end of a connection without a program: `dropping connection, TEXT`.

    code: the structured log's reason (`proxy`, `banner`, `sockname`, `cdb`).
    """

    def __init__(self, text: bytes, code: bytes = b"") -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class Connection:
    # The program's fds 0 and 1 and the descriptors it keeps at their own numbers: the
    # connection itself here; pipes (and UCSPI-TLS's control socket) in a TLS connection.
    pass_fds: tuple[int, ...] = ()

    __slots__ = (
        "_early_end",
        "_fd_open",
        "_holds_slot",
        "_spawn_pending",
        "fd",
        "fixed_local",
        "peer",
        "pid",
        "remote",
        "rule",
        "server",
        "started",
        "ticket",
    )

    def __init__(self, server: Server, fd: int, remote: tuple, fixed_local: tuple | None = None) -> None:
        """A client accepted into one of the server's -c slots, counted already: the connection
        holds it from now on, in the server's registry of live connections, until finish()."""
        self.server = server
        self.fixed_local = fixed_local  # its listener's address, unless that is a wildcard
        self.fd = fd
        self.remote = remote
        self.started = time.monotonic()  # at accept: the status view's age, the structured log's dur_ms
        self.ticket: Ticket | None = None  # its place in the per-address and per-network counts
        self.peer: Peer | None = None
        self.pid = 0  # the program's, once spawned
        self.rule: bytes | None = None  # the matched rule's key, for the structured log only
        self._fd_open = True
        self._spawn_pending = False  # handed to a spawning thread, its answer not back yet
        self._early_end: int | None = None  # the program was reaped before its spawn was reported
        self._holds_slot = True
        server.live.add(self)

    @property
    def stdin_fd(self) -> int:
        return self.fd

    @property
    def stdout_fd(self) -> int:
        return self.fd

    # -- the path ---------------------------------------------------------------------------

    def start(self) -> None:
        """Its path, on the caller's stack until it first waits; a fault starting it drops only it.

        A client known in full at accept (no PROXY header, banner or lookup to wait for) takes
        run()'s steps without a coroutine: its local address, facts and rules are all at hand.
        """
        server = self.server
        if not server.path_waits:
            try:
                local = self.fixed_local
                if local is None:
                    local = self._local_address()
                self.peer = peer = server.facts.known(local, self.remote)
                verdict = self._rules(peer)
                if verdict is not None:
                    self._decided(peer, verdict, None)
                    return
                # The rules file waits for a descriptor: run() takes it from the start.
            except Drop as drop:
                self.dropped(drop)
                return
            except Exception as error:
                self.internal_error(error)
                return
        try:
            start_eagerly(self.run(), server.loop, server.tasks)
        except Exception as error:
            self.internal_error(error)

    async def run(self) -> None:
        """accept (done by the server) -> PROXY header -> banner -> local address -> lookups ->
        rules -> limits -> program."""
        server = self.server
        options = server.options
        try:
            remote, local, relay = self.remote, None, None
            if options.proxy_from is not None:
                proxied = await self._proxy_header()
                if proxied is None:  # a health check, under --proxy-local=close
                    self.finish()
                    return
                remote, local, relay = proxied
            if options.no_delay or options.banner:
                await self._banner()
            if local is None:
                local = self._local_address()
            if server.facts.needs_lookups:
                self.peer = peer = await server.facts.gather(local, remote, relay)
            else:
                self.peer = peer = server.facts.known(local, remote)
            verdict = self._rules(peer)
            if verdict is None:
                verdict = await self._rules_when_descriptors_free(peer)
            self._decided(peer, verdict, relay)
        except Drop as drop:
            self.dropped(drop)
        except Exception as error:
            self.internal_error(error)

    def _decided(self, peer: Peer, verdict: Verdict, relay: Relay | None) -> None:
        """rules -> limits -> program: the rules' verdict carried out."""
        server = self.server
        decision, deny, rule_variables = verdict
        if server.log.structured and decision.key is not None:
            self.rule = rule_key(decision.key, decision.cidr)
        if deny:
            server.denied += 1  # the status view's count
            # No child for a denied client (differences item 1): the server's pid in the line.
            if server.log.verbose:  # an event is built only when it will be written
                server.log.emit(Denied(server.pid, peer, rule=self.rule))
            self.finish()
            return
        limit_variables: list[tuple[bytes, bytes | None]] = []
        if server.limits is not None:
            ticket, refusal, before = server.limits.decide(peer.rules_ip, rule_variables)
            if refusal is not None:
                self._refuse(peer, refusal)
                return
            self.ticket = ticket
            limit_variables = _limit_variables(peer, before)
        self._program(peer, rule_variables, limit_variables, relay)

    def dropped(self, drop: Drop) -> None:
        """The drop's warning, then the connection's end."""
        try:
            self.server.log.emit(Dropped(drop.text, drop.code, self.client_ip()))
        finally:
            self.finish()

    async def _proxy_header(self) -> tuple[tuple, tuple | None, Relay] | None:
        """Before anything is sent: from a --proxy-from peer, exactly its header, else nothing.

        (client, local address or None for the real one, the balancer); None: close it quietly.
        """
        server = self.server
        facts = server.facts
        assert facts.proxy_peers is not None
        if not facts.proxy_peers.trusts(self.remote[0]):
            return self.remote, None, DIRECT  # its bytes are the program's, whatever they say
        options = server.options
        relay = facts.relay(self.remote, ())
        balancer = relay.ip or b""  # always set: made from an address
        with _socket_of(self.fd) as sock:
            try:
                header = await read_header(
                    sock, server.loop, options.proxy_version or "any", options.proxy_timeout or _PROXY_TIMEOUT
                )
            except ProxyError as error:
                raise Drop(b"bad PROXY header from " + balancer + b": " + error.reason, b"proxy") from None
            except ProxyTimeout:
                raise Drop(b"unable to read PROXY header from " + balancer + b": timed out", b"proxy") from None
            except EOFError:
                raise Drop(b"unable to read PROXY header from " + balancer + b": end of file", b"proxy") from None
            except OSError as error:
                reason = error_text(error).encode()
                raise Drop(b"unable to read PROXY header from " + balancer + b": " + reason, b"proxy") from None
        if header.variables:
            relay = facts.relay(self.remote, header.variables)
        if server.log.accepts:  # what the header said: structured modes only
            source = header.source
            server.log.emit(
                Proxied(
                    None if source is None else source[0].encode(),
                    None if source is None else source[1],
                    balancer,
                    relay.port,
                    header.version,
                    b"LOCAL" if header.local else b"PROXY",
                )
            )
        if server.log.verbose:
            for name in header.dropped:
                server.log.emit(ProxyNoted(b"TLV value for " + name + b" from " + balancer + b" dropped"))
        if header.local:
            closing = options.proxy_local == "close"
            if server.log.verbose:
                outcome = b"closed" if closing else b"served with the real endpoints"
                server.log.emit(ProxyNoted(b"local header from " + balancer + b", " + outcome))
            return None if closing else (self.remote, None, relay)
        assert header.source is not None
        return header.source, header.destination, relay

    async def _banner(self) -> None:
        options = self.server.options
        banner = options.banner
        sent = len(banner)
        with _socket_of(self.fd) as sock:
            try:
                if options.no_delay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if banner:
                    sent = sock.send(banner, _SEND_FLAGS)
                if sent < len(banner):
                    # The rest when the client reads: this client waits, nobody else does.
                    sock.setblocking(False)
                    try:
                        await self.server.loop.sock_sendall(sock, banner[sent:])
                    finally:
                        sock.setblocking(True)  # the program gets a blocking socket, as from the original
            except OSError as error:
                raise Drop(b"unable to print banner: " + error_text(error).encode(), b"banner") from None

    def _local_address(self) -> tuple:
        local = self.fixed_local
        if local is not None:
            return local
        try:
            with _socket_of(self.fd) as sock:
                return sock.getsockname()
        except OSError as error:
            raise Drop(b"unable to get local address: " + error_text(error).encode(), b"sockname") from None

    def _rules(self, peer: Peer) -> Verdict | None:
        """The rules' verdict; None when the file's open found no descriptor free (wait, then ask again).

        Not through the descriptor gate at first: a coroutine per client would cost the hot path,
        and the gate keeps a reserve descriptor from its first use on."""
        server = self.server
        rules = server.rules
        if rules is None:
            return _NO_RULE_VERDICT
        try:
            return rules.verdict(peer.rules_ip, peer.remote_host, peer.remote_info)
        except OSError as error:
            if error.errno in SHORTAGE_ERRORS:
                return None
            return self._rules_unreadable(error)

    async def _rules_when_descriptors_free(self, peer: Peer) -> Verdict:
        # The original opens the file in the client's own child, whose table is never full: ours
        # waits in the descriptor gate's line, as a lookup's socket does, instead of dropping.
        rules = self.server.rules
        assert rules is not None
        try:
            return await DESCRIPTORS.opened(lambda: rules.verdict(peer.rules_ip, peer.remote_host, peer.remote_info))
        except OSError as error:
            return self._rules_unreadable(error)

    def _rules_unreadable(self, error: OSError) -> Verdict:
        """No rule under --allow-missing-rules for a missing file; else the original's drop."""
        options = self.server.options
        if isinstance(error, FileNotFoundError) and options.allow_missing_rules:
            return _NO_RULE_VERDICT
        assert options.rules_path is not None
        text = b"unable to read " + options.rules_path + b": " + error_text(error).encode()
        raise Drop(text, b"cdb") from None

    def _refuse(self, peer: Peer, refusal: Refusal) -> None:
        """At a limit: the message once, without waiting, then EOF; no child, the slot back at once."""
        server = self.server
        server.refused += 1  # the status view's count
        with _socket_of(self.fd) as sock:
            with contextlib.suppress(OSError):
                if refusal.message:
                    sock.send(refusal.message, _SEND_FLAGS)
                sock.shutdown(socket.SHUT_WR)
                # What the client already sent is read away: closing on unread data would reset
                # the connection, and the client could lose the message.
                for _ in range(4):
                    if not sock.recv(65536, socket.MSG_DONTWAIT):
                        break
        if server.log.verbose:
            if server.log.structured:
                counts = refusal.counts()
                server.log.emit(Denied(server.pid, peer, refusal.suffix, self.rule, refusal.reason, *counts))
            else:
                server.log.emit(Denied(server.pid, peer, refusal.suffix))
        self.finish()

    def _program(
        self,
        peer: Peer,
        rule_variables: Sequence[tuple[bytes, bytes]],
        limit_variables: list[tuple[bytes, bytes | None]],
        relay: Relay | None,
    ) -> None:
        server = self.server
        # tcp_variables(peer, relay) + the limits' + the rule's, in that order: the TCP ones' shape
        # is one of a few made already, and the others are seldom there.
        shape, values = tcp_shape_and_values(peer)
        if relay is not None or limit_variables or rule_variables:
            others = proxy_variables(relay) if relay is not None else []
            others += limit_variables
            others += rule_variables
            others_shape, others_values = shape_and_values(others)
            shape += others_shape
            values += others_values
        environment = server.environment.build_from(shape, values)
        self._spawn_pending = True
        try:
            server.children.start(self, environment)  # answers through spawn_answered(), never by raising
        except BaseException:
            self._spawn_pending = False
            raise

    # -- after the spawn --------------------------------------------------------------------

    def spawn_answered(self, pid: int, failure: BaseException | None) -> None:
        """The spawn is over (on the loop): whatever goes wrong from here, the slot is accounted for."""
        self._spawn_pending = False
        try:
            self.spawned(pid, failure)
        except Exception as error:
            self.internal_error(error)
        if self._early_end is not None:
            self.reaped(self._early_end)

    def reaped(self, wait_status: int) -> None:
        """The reaper's call: the program's end, whatever goes wrong in telling it."""
        try:
            self.program_ended(wait_status)
        except Exception as error:
            if self._spawn_pending:
                self._early_end = wait_status  # told again once the spawn is reported
                return
            self.pid = 0  # reaped: no program holds the slot any more
            self.internal_error(error)

    def spawned(self, pid: int, failure: BaseException | None) -> None:
        """The program runs as pid, or failure kept it from running."""
        server = self.server
        peer = self.peer
        assert peer is not None  # set before any spawn
        if failure is not None:
            if not isinstance(failure, OSError):
                raise failure
            if isinstance(failure, ForkFailed):
                # No child to log `pid` or `ok`: the original's parent says only this.
                text = b"unable to fork: " + error_text(failure).encode()
                server.log.emit(Dropped(text, b"fork", peer.remote_ip))
                self.finish()
                return
            # posix_spawn reaped the child whose exec failed: the server's own pid stands in its
            # `ok` line (differences item 1).
            server.log.emit(SpawnFailed(server.pid, peer, self.rule))
            self.exec_failed(failure)
            self.finish()
            return
        self.pid = pid
        if server.log.verbose:
            server.log.emit(Served(pid, peer, self.rule))
        self._program_started()

    def exec_failed(self, failure: OSError) -> None:
        """The program could not be run: the original's child's words (the engine's child ends
        next, with 111, as the original's does)."""
        server = self.server
        text = b"unable to run " + server.spawner.program[0] + b": " + error_text(failure).encode()
        server.log.emit(Dropped(text, b"exec", self.client_ip()))

    def _program_started(self) -> None:
        """The program runs, its start logged (a TLS connection starts its relay here)."""
        self._close_descriptor()  # the program has its own copies on 0 and 1

    def program_ended(self, wait_status: int) -> None:
        """The program was reaped: the end line, then the slot is free."""
        if self._spawn_pending:
            self._early_end = wait_status  # its pid and ok lines come first
            return
        try:
            if self.server.log.verbose:
                log = self.server.log
                # From accept to the reap: the structured modes' dur_ms.
                took = int((time.monotonic() - self.started) * 1000) if log.structured else None
                log.emit(ProgramEnded(self.pid, wait_status, self.client_ip(), took))
        finally:
            self.pid = 0
            self._program_gone()

    def _program_gone(self) -> None:
        """The program was reaped: here the connection is over (a TLS one may still be relaying)."""
        self.finish()

    # -- the end ----------------------------------------------------------------------------

    def internal_error(self, error: BaseException) -> None:
        """A fault of ours in this connection: this client is dropped, nobody else is touched."""
        try:
            self.server.log.emit(InternalError(type(error).__name__.encode(), _raised_at(error), self.client_ip()))
        finally:
            if self.pid and not self._spawn_pending:
                # A program runs: the client is its now, and its slot is held until it is reaped.
                self._close_descriptor()
            elif not self._spawn_pending:
                self.finish()

    def client_ip(self) -> bytes:
        """The client's address as the log shows it: its peer's, else the accept's (IPv4 as IPv4)."""
        if self.peer is not None:
            return self.peer.remote_ip
        return accepted_ip(self.remote, self.server.options.mapped_as_ipv6)

    def _close_descriptor(self) -> None:
        if self._fd_open:
            self._fd_open = False
            try:
                os.close(self.fd)
            finally:
                DESCRIPTORS.released()

    def finish(self) -> None:
        """Close the descriptor, give the counts and the slot back; a second call changes nothing."""
        try:
            self._close_descriptor()
        finally:
            if self.ticket is not None:
                self.ticket.give_back()
            if self._holds_slot:
                self._holds_slot = False
                server = self.server
                server.live.discard(self)
                server.slot_given_back()


def accepted_ip(remote: tuple, mapped_as_ipv6: bool) -> bytes:
    """An accepted client's address; an IPv4 client of a dual-stack socket shown as IPv4, as its peer will be."""
    host = remote[0]
    if host.startswith("::ffff:") and "." in host and not mapped_as_ipv6:
        host = host[7:]
    return host.encode()


def _raised_at(error: BaseException) -> tuple[bytes, int] | None:
    """The file and line the error was raised at (no source read: traceback's helpers would)."""
    frame = error.__traceback__
    if frame is None:
        return None
    while frame.tb_next is not None:
        frame = frame.tb_next
    return os.fsencode(frame.tb_frame.f_code.co_filename), frame.tb_lineno


def _limit_variables(peer: Peer, before: int) -> list[tuple[bytes, bytes | None]]:
    """Where the program stands among its address's connections: ipsvd's and s6's variables."""
    variables: list[tuple[bytes, bytes | None]] = [
        (b"TCPCONCURRENCY", b"%d" % (before + 1)),  # ipsvd: this one included
        (b"TCPCONNNUM", b"%d" % before),  # s6: those before it (${PROTO}CONNNUM)
    ]
    if peer.ipv6:
        variables.append((b"TCP6CONNNUM", b"%d" % before))
    return variables


class _socket_of:
    """A socket object over a connection's descriptor for one use; the descriptor stays ours."""

    __slots__ = ("sock",)

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *_exc: object) -> None:
        self.sock.detach()


def start_eagerly(coroutine: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop, tasks: set) -> None:
    """Run coroutine on the caller's stack until it first has to wait; only then make it a task."""
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return
    task = loop.create_task(_resumed(coroutine, waiting_on))
    tasks.add(task)  # a task nobody holds may be collected mid-flight
    task.add_done_callback(tasks.discard)


async def _resumed(coroutine: Coroutine[Any, Any, None], waiting_on: object) -> None:
    await _relay(coroutine, waiting_on)


@types.coroutine
def _relay(coroutine: Coroutine[Any, Any, None], waiting_on: object) -> Generator[Any, Any, None]:
    """What `await coroutine` would do for a coroutine already started: pass its waits to the task."""
    while True:
        try:
            value = yield waiting_on
        except BaseException as thrown:  # cancellation: the coroutine decides what it means
            try:
                waiting_on = coroutine.throw(thrown)
            except StopIteration:
                return
        else:
            try:
                waiting_on = coroutine.send(value)
            except StopIteration:
                return
