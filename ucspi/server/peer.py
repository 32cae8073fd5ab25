"""The facts about one connection: addresses, host names, ident (docs/behaviour.md §6.6 steps 5-10).

Lookups run on the event loop, together, so a slow DNS server or identd delays only its own
client. The DNS library is imported only when an option needs it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ucspi.address import format_ipv4, format_ipv6, is_v4_mapped
from ucspi.server.options import ServerOptions
from ucspi.server.proxy import TrustedPeers

if TYPE_CHECKING:
    from ucspi.server.dns import StubResolver

# A socket address as Python gives it: (host, port) for IPv4, (host, port, flow, scope) for IPv6.
SocketAddress = tuple


@dataclass(frozen=True, slots=True)
class Relay:
    """The balancer a PROXY header came from: TCPPROXYIP, TCPPROXYPORT, and the TLVs' variables.

    DIRECT (no ip) is a server reading headers whose client came straight: it gets none of them.
    """

    ip: bytes | None = None
    port: int = 0
    variables: tuple[tuple[bytes, bytes], ...] = ()


DIRECT = Relay()


@dataclass(slots=True)  # not frozen: a frozen class's __init__ costs every connection ten setattr calls
class Peer:
    """Everything the rules, the log line and the program's environment need to know; never changed once made.

    An IPv4 client is an IPv4 client whatever socket it came in on: dotted quads, PROTO=TCP, the
    0.88 environment. `ipv6` is true for IPv6 clients, and for v4-mapped ones under -6.
    """

    local_ip: bytes
    local_port: int
    local_host: bytes | None
    remote_ip: bytes
    remote_port: int
    remote_host: bytes | None
    remote_info: bytes | None
    ipv6: bool = False
    rules_ip: bytes = b""  # what the rules see: a v4-mapped client's dotted quad, even under -6
    interface: bytes | None = None  # TCP6INTERFACE, for a scoped (link-local) connection


@dataclass(frozen=True, slots=True)
class _Side:
    shown: bytes  # as the environment and the log show it
    plain: str  # for DNS and ident: a dotted quad for an IPv4 client
    port: int
    ipv6: bool
    scope: int


def _side(address: SocketAddress, mapped_as_ipv6: bool) -> _Side:
    host, port = address[0], address[1]
    if len(address) == 2:
        return _Side(host.encode(), host, port, False, 0)
    packed = socket.inet_pton(socket.AF_INET6, host)
    if is_v4_mapped(packed):
        dotted = format_ipv4(packed[12:])
        shown = format_ipv6(packed) if mapped_as_ipv6 else dotted
        return _Side(shown, dotted.decode(), port, mapped_as_ipv6, 0)
    shown = format_ipv6(packed)
    return _Side(shown, shown.decode(), port, True, address[3])


def _interface_name(scope: int) -> bytes | None:
    if not scope:
        return None
    try:
        return socket.if_indextoname(scope).encode()
    except OSError:
        return None


class PeerFacts:
    """Gathers the facts the options ask for: -l or a PTR for the local name, -h, -p, -r."""

    def __init__(self, options: ServerOptions, environ: Mapping[bytes, bytes]) -> None:
        self.local_host = options.local_host
        self.remote_host = options.remote_host
        self.paranoid = options.paranoid
        self.remote_info = options.remote_info
        self.ident_timeout = options.ident_timeout
        self.mapped_as_ipv6 = options.mapped_as_ipv6
        # A proxied client's identd cannot know a connection made to the balancer.
        self.proxied_remote_info = options.remote_info and options.proxy_ident
        self.proxy_peers = TrustedPeers(options.proxy_from) if options.proxy_from is not None else None
        self.resolver: StubResolver | None = None
        if self.local_host is None or self.remote_host:
            from ucspi.server.dns import StubResolver

            self.resolver = StubResolver.from_environment(environ)
        if self.remote_info:
            # Imported now, before -u/-g take effect: the package may not be readable afterwards.
            import ucspi.server.ident  # noqa: F401
        # -H -R -l NAME: everything is known at accept time, no coroutine needed.
        self.needs_lookups = self.resolver is not None or self.remote_info

    def relay(self, balancer: SocketAddress, variables: tuple[tuple[bytes, bytes], ...]) -> Relay:
        """The balancer's address as the environment shows it (canonical, v4-mapped as IPv4)."""
        side = _side(balancer, False)
        return Relay(side.plain.encode(), side.port, variables)

    def _peer(
        self,
        local: _Side,
        remote: _Side,
        local_host: bytes | None,
        remote_host: bytes | None,
        info: bytes | None,
    ) -> Peer:
        ipv6 = remote.ipv6
        return Peer(
            local.shown,
            local.port,
            local_host,
            remote.shown,
            remote.port,
            remote_host,
            info,
            ipv6,
            remote.plain.encode(),
            _interface_name(local.scope) if ipv6 else None,
        )

    def known(self, local: SocketAddress, remote: SocketAddress) -> Peer:
        """The facts when no lookup is needed."""
        if len(remote) == 2:  # an IPv4 socket: the common case, kept short
            remote_ip = remote[0].encode()
            local_host = self.local_host
            return Peer(local[0].encode(), local[1], local_host, remote_ip, remote[1], None, None, False, remote_ip)
        mapped = self.mapped_as_ipv6
        return self._peer(_side(local, mapped), _side(remote, mapped), self.local_host, None, None)

    async def gather(self, local: SocketAddress, remote: SocketAddress, relay: Relay | None = None) -> Peer:
        """The facts the options ask for; relay: the balancer a PROXY header came from, if any."""
        local_side = _side(local, self.mapped_as_ipv6)
        remote_side = _side(remote, self.mapped_as_ipv6)
        # Every connection a header came on is the balancer's, a LOCAL one included.
        ask_ident = self.remote_info if relay is None or relay.ip is None else self.proxied_remote_info
        local_host, remote_host, remote_info = await asyncio.gather(
            self._local_name(local_side.plain),
            self._remote_name(remote_side.plain),
            self._ident(local_side.plain, local_side.port, remote_side.plain, remote_side.port, ask_ident),
        )
        return self._peer(local_side, remote_side, local_host, remote_host, remote_info)

    async def _local_name(self, local_ip: str) -> bytes | None:
        if self.local_host is not None or self.resolver is None:
            return self.local_host
        return await self.resolver.name_of(local_ip)

    async def _remote_name(self, remote_ip: str) -> bytes | None:
        if not self.remote_host or self.resolver is None:
            return None
        name = await self.resolver.name_of(remote_ip)
        if name is None or not self.paranoid:
            return name
        # -p: keep the name only if it resolves back to the client's address.
        if ":" in remote_ip:
            addresses = await self.resolver.addresses6_of(name)
        else:
            addresses = await self.resolver.addresses_of(name)
        return name if remote_ip in addresses else None

    async def _ident(
        self, local_ip: str, local_port: int, remote_ip: str, remote_port: int, ask: bool
    ) -> bytes | None:
        if not ask:
            return None
        from ucspi.server.ident import remote_info

        return await remote_info(local_ip, local_port, remote_ip, remote_port, self.ident_timeout)
