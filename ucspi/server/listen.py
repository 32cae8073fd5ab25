"""The listening socket: host and port resolution, bind, listen, privilege drop (spec 6.3, 6.4)."""

from __future__ import annotations

import errno
import os
import socket

from ucspi.errors import EXIT_TEMPORARY, Fatal, error_text

_DOTTED_CHARACTERS = frozenset("0123456789.[]")


def _fatal(text: str, error: BaseException | int | None = None) -> Fatal:
    message = "tcpserver: fatal: " + text
    if error is not None:
        message += ": " + error_text(error)
    return Fatal(os.fsencode(message), EXIT_TEMPORARY)


def resolve_port(port: str) -> int:
    """Digits are a number cut to 16 bits (the empty string is 0); else a service from /etc/services."""
    if port == "" or (port.isascii() and port.isdigit()):
        return int(port or "0") % 65536
    try:
        return socket.getservbyname(port, "tcp")
    except (OSError, UnicodeError):
        raise _fatal("unable to figure out port number for " + port) from None


def _dotted_quad(host: str) -> str | None:
    """dns_ip4's local parse of a string of digits, dots and brackets: bytes wrap, short is none."""
    octets = []
    value = 0
    for character in host + ".":
        if character in "[]":
            continue
        if character == ".":
            octets.append(value % 256)
            value = 0
        else:
            value = value * 10 + ord(character) - 48
    if len(octets) < 4:
        return None
    return ".".join(str(octet) for octet in octets[:4])


def resolve_host(host: str) -> str:
    """The IPv4 address to bind: `0` and the empty string are all addresses (spec 6.3).

    Literal addresses are parsed as strictly as the original; names go through the system
    resolver, so /etc/hosts is honoured (differences item 3).
    """
    if host in ("", "0"):
        return "0.0.0.0"
    if set(host) <= _DOTTED_CHARACTERS:
        address = _dotted_quad(host)
        if address is None:
            raise _fatal("no IP address for " + host)
        return address
    temporary = f"temporarily unable to figure out IP address for {host}"
    # djb's resolver refuses a label over 63 bytes as a protocol error before asking anyone.
    if any(len(label.encode("utf-8", "surrogateescape")) > 63 for label in host.split(".")):
        raise _fatal(temporary, errno.EPROTO)
    try:
        answers = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise _fatal("no IP address for " + host) from None
        raise _fatal(temporary, errno.EAGAIN) from None
    except (UnicodeError, OSError) as error:
        raise _fatal(temporary, error if isinstance(error, OSError) else errno.EINVAL) from None
    if not answers:
        raise _fatal("no IP address for " + host)
    return str(answers[0][4][0])


def bind_listener(ip: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEADDR, non-blocking for the event loop."""
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as error:
        raise _fatal("unable to create socket", error) from None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((ip, port))
    except OSError as error:
        raise _fatal("unable to bind", error) from None
    # listen() takes an int: the original's unsigned long is cut the same way; the kernel caps it.
    backlog = backlog & 0xFFFFFFFF
    try:
        listener.listen(backlog if backlog < 0x80000000 else 0xFFFF)
    except OSError as error:
        raise _fatal("unable to listen", error) from None
    listener.setblocking(False)
    return listener


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
