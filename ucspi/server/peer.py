"""The facts about one connection: addresses, host names, ident (spec 6.6 steps 5-10).

Lookups run on the event loop, together, so a slow DNS server or identd delays only its own
client. The DNS library is imported only when an option needs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ucspi.server.options import ServerOptions

if TYPE_CHECKING:
    from ucspi.server.dns import StubResolver


@dataclass(frozen=True, slots=True)
class Peer:
    """Everything the rules, the log line and the program's environment need to know."""

    local_ip: bytes
    local_port: int
    local_host: bytes | None
    remote_ip: bytes
    remote_port: int
    remote_host: bytes | None
    remote_info: bytes | None


class PeerFacts:
    """Gathers the facts the options ask for: -l or a PTR for the local name, -h, -p, -r."""

    def __init__(self, options: ServerOptions, environ: Mapping[bytes, bytes]) -> None:
        self.local_host = options.local_host
        self.remote_host = options.remote_host
        self.paranoid = options.paranoid
        self.remote_info = options.remote_info
        self.ident_timeout = options.ident_timeout
        self.resolver: StubResolver | None = None
        if self.local_host is None or self.remote_host:
            from ucspi.server.dns import StubResolver

            self.resolver = StubResolver.from_environment(environ)
        if self.remote_info:
            # Imported now, before -u/-g take effect: the package may not be readable afterwards.
            import ucspi.server.ident  # noqa: F401
        # -H -R -l NAME: everything is known at accept time, no coroutine needed.
        self.needs_lookups = self.resolver is not None or self.remote_info

    def known(self, local: tuple[str, int], remote: tuple[str, int]) -> Peer:
        """The facts when no lookup is needed."""
        return Peer(local[0].encode(), local[1], self.local_host, remote[0].encode(), remote[1], None, None)

    async def gather(self, local: tuple[str, int], remote: tuple[str, int]) -> Peer:
        local_ip, local_port = local
        remote_ip, remote_port = remote
        local_host_lookup = self._local_name(local_ip)
        remote_host_lookup = self._remote_name(remote_ip)
        ident_lookup = self._ident(local_ip, local_port, remote_ip, remote_port)
        local_host, remote_host, remote_info = await asyncio.gather(local_host_lookup, remote_host_lookup, ident_lookup)
        return Peer(
            local_ip.encode(), local_port, local_host, remote_ip.encode(), remote_port, remote_host, remote_info
        )

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
        return name if remote_ip in await self.resolver.addresses_of(name) else None

    async def _ident(self, local_ip: str, local_port: int, remote_ip: str, remote_port: int) -> bytes | None:
        if not self.remote_info:
            return None
        from ucspi.server.ident import remote_info

        return await remote_info(local_ip, local_port, remote_ip, remote_port, self.ident_timeout)
