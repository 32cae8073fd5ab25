"""The listening socket: host and port resolution, bind, listen, privilege drop (docs/behaviour.md §6.3, 6.4)."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket

from ucspi.address import literal_ipv4_addresses
from ucspi.errors import EXIT_TEMPORARY, Fatal, error_text
from ucspi.numbers import scan_ulong


def _fatal(text: str, error: BaseException | int | None = None) -> Fatal:
    message = "tcpserver: fatal: " + text
    if error is not None:
        message += ": " + error_text(error)
    number = error if isinstance(error, int) else getattr(error, "errno", None)
    return Fatal(os.fsencode(message), EXIT_TEMPORARY, number)


def resolve_port(port: str) -> int:
    """Digits are a number cut to 16 bits (the empty string is 0); else a service from /etc/services."""
    if port == "" or (port.isascii() and port.isdigit()):
        return scan_ulong(port) % 65536  # any length, as djb's scan_ulong
    try:
        return socket.getservbyname(port, "tcp")
    except (OSError, UnicodeError):
        raise _fatal("unable to figure out port number for " + port) from None


ALL_IPV4_ADDRESSES = "0.0.0.0"


def resolve_host(host: str, ipv4_only: bool = False) -> str:
    """The address to bind: 0.0.0.0 for `0` and the empty string (docs/behaviour.md §6.3), else an IP.

    `0` is IPv4 alone, as in 0.88: where localhost is ::1 first, a local client is refused over
    IPv6 and falls back to 127.0.0.1, where the rules for local clients are. `::` listens on
    both (README, differences item 3). Literal addresses are parsed as strictly as the original (IPv6
    ones as inet_pton does); names go through the system resolver, so /etc/hosts is honoured,
    IPv4 first as 0.88 looks up A records only, IPv6 when a name has no IPv4 address (-4: never).
    """
    if host in ("", "0"):
        return ALL_IPV4_ADDRESSES
    literal = literal_ipv4_addresses(os.fsencode(host))
    if literal is not None:
        if not literal:
            raise _fatal("no IP address for " + host)
        return literal[0]
    if ":" in host:
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, UnicodeError):
            raise _fatal("no IP address for " + host) from None
        if ipv4_only:
            raise _fatal("no IP address for " + host)
        return host
    temporary = f"temporarily unable to figure out IP address for {host}"
    # djb's resolver refuses a label over 63 bytes as a protocol error before asking anyone.
    if any(len(label.encode("utf-8", "surrogateescape")) > 63 for label in host.split(".")):
        raise _fatal(temporary, errno.EPROTO)
    families = (socket.AF_INET,) if ipv4_only else (socket.AF_INET, socket.AF_INET6)
    for family in families:
        try:
            answers = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
        except socket.gaierror as error:
            if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                continue
            if error.errno == getattr(socket, "EAI_ADDRFAMILY", None):
                continue
            raise _fatal(temporary, errno.EAGAIN) from None
        except (UnicodeError, OSError) as error:
            raise _fatal(temporary, error if isinstance(error, OSError) else errno.EINVAL) from None
        if answers:
            return str(answers[0][4][0])
    raise _fatal("no IP address for " + host)


def _interface_index(interface: bytes | None) -> int:
    """-I: the scope of a link-local address; an unknown name is 0, as if_nametoindex says."""
    if not interface:
        return 0
    try:
        return socket.if_nametoindex(os.fsdecode(interface))
    except OSError:
        return 0


def _listening_socket(family: int, address: tuple, backlog: int, dual_stack: bool | None) -> socket.socket:
    """dual_stack None leaves IPV6_V6ONLY at the system's default, as the IPv6 build does."""
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise _fatal("unable to create socket", error) from None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and dual_stack is not None:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise _fatal("unable to bind", error) from None
    # listen() takes an int: the original's unsigned long is cut the same way; the kernel caps it.
    backlog = backlog & 0xFFFFFFFF
    try:
        listener.listen(backlog if backlog < 0x80000000 else 0xFFFF)
    except OSError as error:
        raise _fatal("unable to listen", error) from None
    listener.setblocking(False)
    return listener


def bind_listener(
    ip: str, port: int, backlog: int, ipv4_only: bool = False, interface: bytes | None = None
) -> socket.socket:
    """A listening TCP socket with SO_REUSEADDR, non-blocking for the event loop.

    `::` is one socket for IPv6 and IPv4 clients (v4-mapped), whatever the system's
    net.ipv6.bindv6only says. ipv4_only was applied by resolve_host: an IP here is already one.
    """
    if ":" in ip:
        dual_stack = True if socket.inet_pton(socket.AF_INET6, ip) == bytes(16) else None
        return _listening_socket(socket.AF_INET6, (ip, port, 0, _interface_index(interface)), backlog, dual_stack)
    return _listening_socket(socket.AF_INET, (ip, port), backlog, None)


def drop_privileges(uid: int, gid: int) -> None:
    """Group first (only that group, no supplementary ones), then user; 0 leaves each alone."""
    if gid:
        try:
            os.setgroups([gid])
            os.setgid(gid)
        except (OSError, OverflowError) as error:
            raise _fatal("unable to set gid", error if isinstance(error, OSError) else errno.EINVAL) from None
    if uid:
        try:
            os.setuid(uid)
        except (OSError, OverflowError) as error:
            raise _fatal("unable to set uid", error if isinstance(error, OSError) else errno.EINVAL) from None


# ---- listeners a supervisor hands over (README, Supervisors; differences item 12)

# systemd's first passed descriptor (sd_listen_fds(3): SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def _endpoint_text(address: tuple) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def _inherited_listener(fd: int, origin: str) -> socket.socket:
    """fd as a listening TCP socket of either family, non-blocking and never passed to a program.

    Anything else is fatal: serving a datagram or connected socket as a listener would fail
    with every client instead of once at start.
    """
    described = f"fd {fd} from {origin}"
    try:
        os.fstat(fd)
    except OSError as error:
        raise _fatal("unable to use " + described, error) from None
    try:
        listener = socket.socket(fileno=fd)
    except OSError:
        raise _fatal(described + " is not a listening TCP socket") from None
    try:
        is_tcp = (
            listener.family in (socket.AF_INET, socket.AF_INET6)
            and listener.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
            and listener.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
            and listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        )
        listener.getsockname()
    except OSError:
        listener.detach()
        raise _fatal(described + " is not a listening TCP socket") from None
    if not is_tcp:
        listener.detach()
        raise _fatal(described + " is not a listening TCP socket")
    # systemd passes them blocking and inheritable: the loop needs the one, programs must not get the other.
    listener.set_inheritable(False)
    listener.setblocking(False)
    return listener


def systemd_listeners(environ: dict[bytes, bytes], pid: int) -> list[socket.socket] | None:
    """The sockets of systemd's socket activation, or None when they are not meant for us.

    As sd_listen_fds: only when LISTEN_PID is our pid (a variable inherited from further up
    names another process) and LISTEN_FDS is at least 1.
    """
    if environ.get(b"LISTEN_PID") != b"%d" % pid:
        return None
    count_text = environ.get(b"LISTEN_FDS", b"")
    if not count_text.isdigit() or len(count_text) > 6 or int(count_text) < 1:
        return None
    return [_inherited_listener(fd, "LISTEN_FDS") for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count_text))]


def stdin_listener() -> socket.socket:
    """--inherit=stdin: s6's pre-bound socket on fd 0, moved to a descriptor of its own.

    0.88 puts /dev/null on fd 0 after start-up; the socket must live elsewhere by then.
    """
    _inherited_listener(0, "stdin").detach()  # checked on fd 0, then moved
    try:
        moved = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START)
    except OSError as error:
        raise _fatal("unable to move stdin", error) from None
    return socket.socket(fileno=moved)


def _same_address(wanted: str, actual: str) -> bool:
    try:
        return ipaddress.ip_address(wanted.partition("%")[0]) == ipaddress.ip_address(actual.partition("%")[0])
    except ValueError:
        return False


def matching_listeners(
    listeners: list[socket.socket], host: str, port: int, ipv4_only: bool = False
) -> list[socket.socket]:
    """The inherited sockets the `host port` arguments name: `0 0` takes all, else each must match.

    Host `0` is 0.0.0.0 and `::` is [::], as when binding; port 0 matches any port. An inherited
    socket the arguments do not name is fatal: it would otherwise be held and never served.
    """
    if host in ("", "0") and port == 0:
        return listeners
    wanted_ip = resolve_host(host, ipv4_only)
    for listener in listeners:
        address = listener.getsockname()
        if not _same_address(wanted_ip, address[0]) or (port and address[1] != port):
            raise _fatal(f"inherited socket {_endpoint_text(address)} does not match {host} {port}")
    return listeners
