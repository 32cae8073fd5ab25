"""Where tcpclient connects and how: host and port arguments, the local binding, the -T schedule.

Pure parsing and blocking sockets only: no event loop, nothing imported that a plain
`tcpclient -H -R -l NAME 1.2.3.4 25 prog` does not need (it is run in loops by scripts).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable, Sequence

from ucspi.address import literal_ipv4_addresses
from ucspi.errors import EXIT_TEMPORARY, Fatal, error_text
from ucspi.numbers import scan_ulong

FATAL = "tcpclient: fatal: "
# 0.88 connects to 127.0.0.1 for host `0` and the empty host (Debian's IPv6 build: ::1).
LOCAL_HOST = "127.0.0.1"
# poll() takes an int of milliseconds; longer waits go round again.
_LONGEST_POLL_MS = 1 << 30


def fatal(text: str, error: BaseException | int | None = None) -> Fatal:
    """`tcpclient: fatal: TEXT[: djb error]`, exit 111."""
    message = FATAL + text
    if error is not None:
        message += ": " + error_text(error)
    return Fatal(os.fsencode(message), EXIT_TEMPORARY)


def ip4_scan(text: str) -> str | None:
    """djb's ip4_scan (-i): four dotted numbers, each cut to a byte; what follows them is ignored."""
    octets = []
    position = 0
    for index in range(4):
        if index:
            if text[position : position + 1] != ".":
                return None
            position += 1
        rest = text[position:]
        digits = len(rest) - len(rest.lstrip("0123456789")) if rest[:1].isascii() else 0
        if not digits:
            return None
        octets.append(scan_ulong(rest[:digits]) & 0xFF)
        position += digits
    return ".".join(map(str, octets))


def _unique(addresses: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


def resolve_host(host: str, ipv4_only: bool = False) -> list[str]:
    """The addresses to try, in order. `0` and the empty host are 127.0.0.1.

    Literal addresses are parsed as the original parses them; names go through the system
    resolver (so /etc/hosts counts), IPv4 first as 0.88 asks for A records, IPv6 only for a
    name without IPv4 addresses (never under -4), as tcpserver does with its host.
    """
    if host in ("", "0"):
        host = LOCAL_HOST
    literal = literal_ipv4_addresses(os.fsencode(host))
    if literal is not None:
        if not literal:
            raise fatal("no IP address for " + host)
        return literal
    if ":" in host:
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, UnicodeError, ValueError):
            raise fatal("no IP address for " + host) from None
        if ipv4_only:
            raise fatal("no IP address for " + host)
        return [host]
    temporary = "temporarily unable to figure out IP address for " + host
    # djb's resolver refuses a label over 63 bytes as a protocol error before asking anyone.
    if any(len(label.encode("utf-8", "surrogateescape")) > 63 for label in host.split(".")):
        raise fatal(temporary, errno.EPROTO)
    not_found = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
    not_found.add(getattr(socket, "EAI_ADDRFAMILY", socket.EAI_NONAME))
    for family in (socket.AF_INET,) if ipv4_only else (socket.AF_INET, socket.AF_INET6):
        try:
            answers = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
        except socket.gaierror as error:
            if error.errno in not_found:
                continue
            raise fatal(temporary, errno.EAGAIN) from None
        except (UnicodeError, OSError) as error:
            raise fatal(temporary, error if isinstance(error, OSError) else errno.EINVAL) from None
        addresses = _unique([str(answer[4][0]) for answer in answers])
        if addresses:
            return addresses
    raise fatal("no IP address for " + host)


def resolve_port(port: str) -> int:
    """All ASCII digits (or nothing): a number cut to 16 bits, `016` is 16; else /etc/services."""
    if port == "" or (port.isascii() and port.isdigit()):
        return scan_ulong(port) % 65536
    try:
        return socket.getservbyname(port, "tcp")
    except (OSError, UnicodeError):
        raise fatal("unable to figure out port number for " + port) from None


def parse_connect_timeouts(text: str) -> tuple[int, int]:
    """-T x+y: x, an optional `+`, then y; each number scanned as djb does (`-T 5` is 5+0)."""
    first_digits = len(text) - len(text.lstrip("0123456789"))
    first = scan_ulong(text)
    rest = text[first_digits:]
    if rest[:1] == "+":
        rest = rest[1:]
    return first, scan_ulong(rest)


def _timeout_connect(sock: socket.socket, address: tuple, seconds: float) -> int:
    """djb's timeoutconn: 0 once connected, else the errno (ETIMEDOUT when the time ran out)."""
    try:
        sock.connect(address)
        return 0
    except (BlockingIOError, InterruptedError):
        pass
    except OSError as error:
        return error.errno or errno.EIO
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if poller.poll(max(0, min(int(left * 1000) + 1 if left > 0 else 0, _LONGEST_POLL_MS))):
            break
        if time.monotonic() >= deadline:
            return errno.ETIMEDOUT
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _socket_address(ip: str, port: int, scope: int) -> tuple:
    return (ip, port, 0, scope) if ":" in ip else (ip, port)


def _local_ip_for(remote_ip: str, local_ip: str | None) -> str:
    """The address to bind: -i's, else any; an IPv4 -i for an IPv6 peer as its v4-mapped form."""
    if ":" in remote_ip:
        if local_ip is None:
            return "::"
        return local_ip if ":" in local_ip else "::ffff:" + local_ip
    return local_ip if local_ip is not None else "0.0.0.0"


def open_connection(
    addresses: Sequence[str],
    port: int,
    *,
    timeouts: tuple[int, int],
    local_ip: str | None = None,
    local_port: int = 0,
    scope: int = 0,
    warn: Callable[[str, int, int], None],
) -> socket.socket | None:
    """The first address that answers, as 0.88 tries them: each for x seconds, then the ones that
    timed out again for y seconds (one address gets x+y at once). warn(ip, port, errno) for every
    final failure; None when none answered. Socket and bind errors are fatal, as in the original.
    """
    first, second = timeouts
    if len(addresses) == 1:
        first, second = first + second, 0
    pending = list(addresses)
    for round_number, seconds in enumerate((first, second)):
        timed_out: list[str] = []
        for ip in pending:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as error:
                raise fatal("unable to create socket", error) from None
            try:
                sock.bind(_socket_address(_local_ip_for(ip, local_ip), local_port, scope))
            except OSError as error:
                sock.close()
                raise fatal("unable to bind socket", error) from None
            except (OverflowError, ValueError):
                sock.close()
                raise fatal("unable to bind socket", errno.EINVAL) from None
            result = _timeout_connect(sock, _socket_address(ip, port, scope), seconds)
            if result == 0:
                # The program reads and writes it as any descriptor: blocking, as timeoutconn leaves it.
                sock.setblocking(True)
                return sock
            sock.close()
            if round_number == 0 and second and result == errno.ETIMEDOUT:
                timed_out.append(ip)
            else:
                warn(ip, port, result)
        pending = timed_out
    return None
