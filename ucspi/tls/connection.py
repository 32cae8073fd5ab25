"""sslserver's connection: tcpserver's path with the handshake before the program (README, sslserver).

accept, PROXY header, lookups, rules (a deny costs no TLS work), limits, then:
- without -n: the handshake (one -T deadline, on the loop), the -B banner through TLS, then the
  program, with plaintext pipes for its fds 0 and 1 and the relay between them and the session;
- with -n (UCSPI-TLS): the program at once on the plain, blocking socket, with SSLCTLFD,
  SSLREADFD and SSLWRITEFD; `y`/`Y` on the control socket starts the handshake and the relay.
The -c slot is held from accept until the relay is over and the program has been reaped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar, TypeVar

from ucspi.errors import error_text
from ucspi.server.connection import Connection, Drop
from ucspi.server.descriptors import DESCRIPTORS, SHORTAGE_ERRORS
from ucspi.server.limits import Refusal
from ucspi.server.log import Dropped, TLSAccepted, TLSFailed, TLSTruncated
from ucspi.server.peer import Peer, Relay
from ucspi.server.spawn import proxy_variables, tcp_variables
from ucspi.tls.context import TLSSetup, certificate_variables
from ucspi.tls.options import CLIENT_CERT_MATCH
from ucspi.tls.relay import HandshakeFailed, TLSSession
from ucspi.tls.relay import Relay as TLSRelay

_Opened = TypeVar("_Opened")


def ssl_address_variables(peer: Peer) -> list[tuple[bytes, bytes | None]]:
    """PROTO=SSL and the seven SSL* variables, each removed when unknown (as tcpserver's TCP*)."""
    return [
        (b"PROTO", b"SSL"),
        (b"SSLLOCALIP", peer.local_ip),
        (b"SSLLOCALPORT", b"%d" % peer.local_port),
        (b"SSLLOCALHOST", peer.local_host),
        (b"SSLREMOTEIP", peer.remote_ip),
        (b"SSLREMOTEPORT", b"%d" % peer.remote_port),
        (b"SSLREMOTEHOST", peer.remote_host),
        (b"SSLREMOTEINFO", peer.remote_info),
    ]


def session_variables(setup: TLSSetup, sslobj: ssl.SSLObject, server_variables: list) -> list[tuple[bytes, bytes]]:
    """-s: mod_ssl's SSL_* variables, as far as Python 3.11's ssl can tell them (no chains)."""
    name, _protocol, secret_bits = sslobj.cipher() or ("", "", 0)
    bits = int(secret_bits or 0)
    variables: list[tuple[bytes, bytes]] = [
        (b"SSL_PROTOCOL", os.fsencode(sslobj.version() or "")),
        (b"SSL_CIPHER", os.fsencode(name)),
        (b"SSL_CIPHER_EXPORT", b"true" if bits < 56 else b"false"),
        (b"SSL_CIPHER_USEKEYSIZE", b"%d" % bits),
        (b"SSL_CIPHER_ALGKEYSIZE", b"%d" % setup.algorithm_bits.get(name, bits)),
        (b"SSL_VERSION_INTERFACE", b"ucspi-ssl"),
        (b"SSL_VERSION_LIBRARY", os.fsencode(ssl.OPENSSL_VERSION)),
    ]
    session = sslobj.session
    if session is not None and session.id:
        variables.append((b"SSL_SESSION_ID", session.id.hex().encode()))
    server_name = getattr(sslobj, "ucspi_server_name", None)
    if server_name:
        variables.append((b"SSL_TLS_SNI_SERVERNAME", os.fsencode(server_name)))  # s6's name
    variables += server_variables
    der = sslobj.getpeercert(binary_form=True)
    if der:
        variables += certificate_variables("SSL_CLIENT", sslobj.getpeercert() or {}, der)
    return variables


def name_matches(sslobj: ssl.SSLObject, peer: Peer) -> bool:
    """-z: the client's certificate names its host name (SAN DNS, else CN) or its address (SAN IP)."""
    certificate = sslobj.getpeercert() or {}
    names = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]
    addresses = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "IP Address"]
    if not names and not addresses:
        names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    remote_ip = os.fsdecode(peer.remote_ip)
    if any(address.lower() == remote_ip.lower() for address in addresses):
        return True
    host = os.fsdecode(peer.remote_host or b"").lower().rstrip(".")
    if not host:
        return False
    for name in names:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def _blob(variables: list[tuple[bytes, bytes]]) -> bytes:
    """UCSPI-TLS's `Y` answer: NAME=value\\0 ... then one more \\0 (no bare-NAME unsets: s/qmail's parser)."""
    return b"".join(name + b"=" + value.replace(b"\0", b"") + b"\0" for name, value in variables) + b"\0"


class TLSConnection(Connection):
    setup: ClassVar[TLSSetup]  # set by the command before the server starts

    __slots__ = (
        "_changes",
        "_ctl",
        "_ctl_timer",
        "_program_fds",
        "_program_over",
        "_program_pid",
        "_relay",
        "_relay_over",
        "_rule_variables",
        "_session",
        "_tls_fds",
    )

    def __init__(self, *arguments: object, **keywords: object) -> None:
        super().__init__(*arguments, **keywords)  # type: ignore[arg-type]
        self._program_fds: tuple[int, ...] = ()  # the program's ends: 0, 1, then the -n extras
        self._tls_fds: tuple[int, ...] = ()  # ours: to the program's 0, from its 1
        self._ctl: socket.socket | None = None  # -n: our end of the control socket
        self._ctl_timer: asyncio.TimerHandle | None = None  # -n: -w's bound on the wait for its byte
        self._session: TLSSession | None = None
        self._relay: TLSRelay | None = None
        self._relay_over = False
        self._program_over = False
        self._program_pid = 0  # kept past the reap, for the relay's truncation line
        self._changes: list[tuple[bytes, bytes | None]] = []
        self._rule_variables: Sequence[tuple[bytes, bytes]] = ()

    @property
    def stdin_fd(self) -> int:
        return self._program_fds[0] if not self.setup.options.starttls else self.fd

    @property
    def stdout_fd(self) -> int:
        return self._program_fds[1] if not self.setup.options.starttls else self.fd

    @property
    def pass_fds(self) -> tuple[int, ...]:  # type: ignore[override]
        return self._program_fds if self.setup.options.starttls else ()

    # -- the path -----------------------------------------------------------------------------

    async def _banner(self) -> None:
        if self.setup.options.starttls:
            await super()._banner()  # the program speaks plaintext first: so does the banner
            return
        if self.server.options.no_delay:
            try:
                self.fd_socket_option()
            except OSError as error:
                raise Drop(b"unable to set TCP_NODELAY: " + os.fsencode(str(error))) from None

    def fd_socket_option(self) -> None:
        sock = socket.socket(fileno=self.fd)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        finally:
            sock.detach()

    def _refuse(self, peer: Peer, refusal: Refusal) -> None:
        """At a limit: closed without the message (plaintext would be garbage to a TLS client), but under -n."""
        if refusal.message and not self.setup.options.starttls:
            refusal = dataclasses.replace(refusal, message=b"")
        super()._refuse(peer, refusal)

    def _program(
        self,
        peer: Peer,
        rule_variables: Sequence[tuple[bytes, bytes]],
        limit_variables: list[tuple[bytes, bytes | None]],
        relay: Relay | None,
    ) -> None:
        options = self.setup.options
        changes = ssl_address_variables(peer)
        if options.tcp_variables:
            changes += [change for change in tcp_variables(peer, relay) if change[0] != b"PROTO"]
        elif relay is not None:
            changes += proxy_variables(relay)
        changes += limit_variables
        self._changes = changes
        self._rule_variables = rule_variables
        from ucspi.server.connection import start_eagerly

        steps = self._program_plain(rule_variables) if options.starttls else self._handshake_then_program()
        start_eagerly(self._ending_on_failure(steps), self.server.loop, self.server.tasks)

    async def _ending_on_failure(self, steps: Coroutine[Any, Any, None]) -> None:
        """The connection's steps after the limits; a drop or a fault ends it, as in Connection.run."""
        try:
            await steps
        except Drop as drop:
            self.dropped(drop)
        except Exception as error:
            self.internal_error(error)

    async def _handshake(self) -> TLSSession | None:
        """The handshake within -T, and the client's certificate checked: the session, logged;
        None when either failed (the failed handshake logged)."""
        session = self._new_session()
        try:
            await session.handshake(self.setup.options.handshake_timeout)
        except HandshakeFailed as failure:
            self.server.log.emit(TLSFailed(b"accept", os.fsencode(failure.reason), self.client_ip()))
            return None
        if not self._client_accepted(session):
            return None
        self._log_accept(session)
        return session

    async def _handshake_then_program(self) -> None:
        session = await self._handshake()
        if session is None:
            self.finish()
            return
        changes = list(self._changes)
        if self.setup.options.ssl_variables:
            changes += session_variables(self.setup, session.ssl, self._server_variables(session))
        changes += self._rule_variables
        # Pipes: the program's ends blocking (as a program expects), ours made non-blocking by the relay.
        (to_program_read, to_program_write), (from_program_read, from_program_write) = await _pipes()
        self._program_fds = (to_program_read, from_program_write)
        self._tls_fds = (to_program_write, from_program_read)
        self._spawn(changes)

    def _new_session(self) -> TLSSession:
        session = TLSSession(self.server.loop, self.fd, self.setup.context)
        self._session = session
        if self.setup.by_name:
            session.ssl.ucspi_server_name = None  # type: ignore[attr-defined]
        return session

    def _server_variables(self, session: TLSSession) -> list:
        found = self.setup.for_name(getattr(session.ssl, "ucspi_server_name", None))
        return found[1] if found is not None else self.setup.server_variables

    def _client_accepted(self, session: TLSSession) -> bool:
        if self.setup.options.client_cert == CLIENT_CERT_MATCH:
            assert self.peer is not None
            if not name_matches(session.ssl, self.peer):
                self.server.log.emit(Dropped(b"client name does not match certificate", b"tls", self.client_ip()))
                return False
        return True

    def _log_accept(self, session: TLSSession) -> None:
        server = self.server
        if server.log.verbose:
            if self.setup.options.log_cipher:
                cipher = session.ssl.cipher()
                protocol = os.fsencode(session.ssl.version() or "")
                event = TLSAccepted(server.pid, protocol, os.fsencode(cipher[0] if cipher else ""), self.client_ip())
            else:
                event = TLSAccepted(server.pid, ip=self.client_ip())
            server.log.emit(event)

    def _spawn(self, changes: list[tuple[bytes, bytes | None]]) -> None:
        environment = self.server.environment.build(changes)
        self._spawn_pending = True
        try:
            self.server.children.start(self, environment)
        except BaseException:
            self._spawn_pending = False
            raise

    # -- -n: UCSPI-TLS ------------------------------------------------------------------------

    async def _program_plain(self, rule_variables: Sequence[tuple[bytes, bytes]]) -> None:
        ours, theirs = await _opened(_control_pair, b"unable to create socketpair: ")
        self._ctl = ours
        ours.setblocking(False)
        try:
            (to_program_read, to_program_write), (from_program_read, from_program_write) = await _pipes()
        except BaseException:
            theirs.close()
            raise
        self._program_fds = (theirs.detach(), to_program_read, from_program_write)
        self._tls_fds = (to_program_write, from_program_read)
        control, reading, writing = self._program_fds
        changes = list(self._changes)
        changes += [(b"SSLCTLFD", b"%d" % control), (b"SSLREADFD", b"%d" % reading), (b"SSLWRITEFD", b"%d" % writing)]
        changes += rule_variables
        self._spawn(changes)

    def _on_control(self) -> None:
        ctl = self._ctl
        if ctl is None:
            return
        self._cancel_control_timer()
        try:
            command = ctl.recv(1)
        except BlockingIOError:
            return
        except OSError:
            command = b""
        self.server.loop.remove_reader(ctl.fileno())
        if command in (b"y", b"Y"):
            from ucspi.server.connection import start_eagerly

            start_eagerly(self._starttls(command == b"Y"), self.server.loop, self.server.tasks)
            return
        if command:
            self.server.log.emit(Dropped(b"unknown UCSPI-TLS command " + _printable(command), b"tls", self.client_ip()))
            self._terminate_program()
        # EOF: the program declined TLS (or ended); it keeps the plain connection to itself.
        self._relay_over = True
        self._close_descriptor()
        self._end_if_over()

    async def _starttls(self, send_variables: bool) -> None:
        server = self.server
        try:
            session = await self._handshake()
            if session is None:
                self._after_failed_starttls()
                return
            ctl = self._ctl
            if ctl is not None:
                if send_variables:
                    blob = _blob(session_variables(self.setup, session.ssl, self._server_variables(session)))
                    try:
                        await server.loop.sock_sendall(ctl, blob)
                    except OSError:
                        pass  # the program went away: the relay finds out
                # Closed after the blob, so that readers to EOF (s6) and to the double NUL both stop.
                ctl.close()
                self._ctl = None
            self._start_relay(session)
        except Exception as error:
            self.internal_error(error)

    def _control_timed_out(self) -> None:
        """-w passed without y, Y or EOF (README, sslserver, STARTTLS): as a failed handshake, the slot given back."""
        self._ctl_timer = None
        if self._ctl is None or self._session is not None:
            return
        try:
            self.server.log.emit(TLSFailed(b"speak", b"timeout", self.client_ip()))
        finally:
            self._after_failed_starttls()

    def _cancel_control_timer(self) -> None:
        timer = self._ctl_timer
        if timer is not None:
            self._ctl_timer = None
            timer.cancel()

    def _after_failed_starttls(self) -> None:
        """The program must not hang: SIGTERM (as fehcom's), and EOF on every descriptor it has from us."""
        self._terminate_program()
        self._relay_over = True
        self._close_descriptor()
        self._end_if_over()

    def _terminate_program(self) -> None:
        if self.pid and not self._spawn_pending:
            try:
                os.kill(self.pid, signal.SIGTERM)
                os.kill(self.pid, signal.SIGCONT)
            except OSError:
                pass

    # -- after the spawn ----------------------------------------------------------------------

    def spawned(self, pid: int, failure: BaseException | None) -> None:
        for fd in self._program_fds:  # the program has its own copies now (or never will)
            try:
                os.close(fd)
            except OSError:
                pass
        self._program_fds = ()
        super().spawned(pid, failure)  # logs; on a failure it finishes

    def _program_started(self) -> None:
        """The socket stays ours: the relay (or, under -n, the control socket's wait) starts."""
        server = self.server
        self._program_pid = self.pid
        if self.setup.options.starttls:
            assert self._ctl is not None
            server.loop.add_reader(self._ctl.fileno(), self._on_control)
            if self.setup.options.idle_timeout > 0:
                self._ctl_timer = server.loop.call_later(self.setup.options.idle_timeout, self._control_timed_out)
            return
        assert self._session is not None
        self._start_relay(self._session)

    def _start_relay(self, session: TLSSession) -> None:
        to_program, from_program = self._tls_fds
        self._tls_fds = ()
        banner = self.server.options.banner if not self.setup.options.starttls else b""
        relay = TLSRelay(session, to_program, from_program, self.setup.options.idle_timeout, self._relay_ended, banner)
        self._relay = relay
        if self.server.log.verbose:
            relay.on_truncation = self._truncated
        if self._program_over:
            relay.program_gone()
        relay.start()

    def _truncated(self) -> None:
        """At -v, when the relay sees it: before the program's EOF, so before its end line."""
        self.server.log.emit(TLSTruncated(self._program_pid, self.client_ip()))

    def _relay_ended(self, reason: str | None) -> None:
        try:
            if reason is not None:
                self.server.log.emit(TLSFailed(b"speak", os.fsencode(reason), self.client_ip()))
        finally:
            self._relay_over = True
            self._close_descriptor()
            self._end_if_over()

    def _program_gone(self) -> None:
        """Reaped (its end line written by Connection.program_ended): the relay may still be delivering."""
        self._program_over = True
        relay = self._relay
        if relay is not None and not relay.over:
            relay.program_gone()
        self._end_if_over()

    def _end_if_over(self) -> None:
        if self._program_over and self._relay_over:
            self.finish()

    # -- the end ------------------------------------------------------------------------------

    def _close_descriptor(self) -> None:
        relay = self._relay
        if relay is not None:
            relay.let_go()
        session = self._session
        if session is not None and relay is None:
            for writing in (False, True):  # a handshake cut short may still be watching
                try:
                    (self.server.loop.remove_writer if writing else self.server.loop.remove_reader)(self.fd)
                except Exception:
                    pass
        self._cancel_control_timer()
        ctl = self._ctl
        if ctl is not None:
            self._ctl = None
            try:
                self.server.loop.remove_reader(ctl.fileno())
            except Exception:
                pass
            ctl.close()
        for fd in (*self._tls_fds, *self._program_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._tls_fds = self._program_fds = ()
        super()._close_descriptor()

    def internal_error(self, error: BaseException) -> None:
        self._relay_over = True
        if self.pid and not self._spawn_pending:
            self._program_over = False  # its reaping finishes the connection
        super().internal_error(error)


async def _pipes() -> tuple[tuple[int, int], tuple[int, int]]:
    """The program's two pipes (close-on-exec; spawn dup2s its ends onto 0 and 1), or Drop."""
    return await _opened(_two_pipes, b"unable to create pipe: ")


def _two_pipes() -> tuple[tuple[int, int], tuple[int, int]]:
    first = os.pipe()
    try:
        return first, os.pipe()
    except BaseException:
        for fd in first:
            os.close(fd)
        raise


def _control_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


async def _opened(open_: Callable[[], _Opened], failure: bytes) -> _Opened:
    """open_()'s descriptors; with none free, they are waited for in the descriptor gate's line, as
    a lookup's socket is (the original makes them in the client's own child, whose table is never
    full). Drop with `failure` and the error's words when they cannot be had.

    Tried here first, not in the gate: the gate keeps a reserve descriptor from its first use on,
    which a server whose table never filled need not hold."""
    try:
        return open_()
    except OSError as error:
        if error.errno not in SHORTAGE_ERRORS:
            raise Drop(failure + error_text(error).encode(), b"tls") from None
    try:
        return await DESCRIPTORS.opened(open_)
    except OSError as error:
        raise Drop(failure + error_text(error).encode(), b"tls") from None


def _printable(data: bytes) -> bytes:
    return b"".join(bytes([byte]) if 33 <= byte <= 126 else b"\\x%02x" % byte for byte in data)
