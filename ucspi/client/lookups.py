"""tcpclient's network lookups: PTR names for TCPLOCALHOST and TCPREMOTEHOST (-h), ident (-r).

Imported only when an option needs one: the resolver brings dnspython and asyncio with it.
Each lookup runs to its end before the next starts, in 0.88's order, through the server's own
stub resolver ($DNSCACHEIP, else resolv.conf) and ident client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import dns.exception
import dns.rdatatype
import dns.reversename

from ucspi.server.dns import StubResolver, first_ptr_name
from ucspi.server.ident import remote_info as _remote_info


async def _name_of(resolver: StubResolver, ip: str) -> bytes | None:
    try:
        packet = await resolver.resolve(dns.reversename.from_address(ip), dns.rdatatype.PTR)
        if packet is None:
            return None
        # An answer without a PTR (NXDOMAIN included) is an empty name, not a failure: 0.88's
        # tcpclient sets the variable to "" there, where tcpserver removes it.
        return first_ptr_name(packet)
    except (OSError, ValueError, dns.exception.DNSException):
        return None


def host_name(ip: str, environ: Mapping[bytes, bytes]) -> bytes | None:
    """dns_name4: the first PTR name of ip, b"" when the answer has none, None when the lookup failed."""
    return asyncio.run(_name_of(StubResolver.from_environment(environ), ip))


def remote_info(local_ip: str, local_port: int, remote_ip: str, remote_port: int, timeout: float) -> bytes | None:
    """The identd's answer for our connection (RFC 1413), None when the exchange failed."""
    return asyncio.run(_remote_info(local_ip, local_port, remote_ip, remote_port, timeout))
