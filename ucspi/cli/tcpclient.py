"""tcpclient [opts] host port program [args...]: connect, set TCP* variables, run the program on fds 6 and 7."""

from __future__ import annotations

import os
import signal
import socket
import sys

from ucspi.cli import answer_help_or_version
from ucspi.cli.getopt import GetoptError, getopt
from ucspi.client.connect import fatal, ip4_scan, open_connection, parse_connect_timeouts, resolve_host, resolve_port
from ucspi.client.environment import exec_program
from ucspi.environ import first_values, pathexec_changes, read_initial_environment
from ucspi.errors import EXIT_PERMANENT, EXIT_TEMPORARY, Fatal, error_text
from ucspi.numbers import scan_ulong

# 0.88's usage line: -4, -6 and -I (Debian's IPv6 build) are accepted but not listed.
USAGE = (
    b"tcpclient: usage: tcpclient [ -hHrRdDqQv ] [ -i localip ] [ -p localport ] [ -T timeoutconn ]"
    b" [ -l localname ] [ -t timeoutinfo ] host port program"
)
FLAG_LETTERS = "46dDvqQhHrR"
ARGUMENT_LETTERS = "ipTtlI"
# The connection's two descriptors in the program: read on 6, write on 7.
READ_FD = 6
WRITE_FD = 7

HELP = """\
Usage: tcpclient [options] host port program [args...]

  Connect to HOST (0 for 127.0.0.1) on PORT, set the TCP* environment variables, and run
  PROGRAM with the connection on descriptors 6 (read) and 7 (write).

Options:
  -v / -Q / -q      verbose (a line once connected) / errors only (default) / nothing
  -h / -H           look up TCPREMOTEHOST in DNS (default) / do not
  -r / -R           ask the server's identd for TCPREMOTEINFO (default) / do not
  -d / -D           delay small packets (default) / TCP_NODELAY
  -i localip        bind this local address (default: any)
  -p localport      bind this local port (default: any)
  -l localname      TCPLOCALHOST without a DNS lookup
  -t timeoutinfo    seconds for the ident lookup (default 26)
  -T x+y            try each address x seconds, then the ones that timed out y more (default 2+58)
  -4 / -6           IPv4 addresses only / accepted, as in the IPv6 build
  -I interface      the scope of a link-local IPv6 address

Exit codes:
  100               usage error
  111               temporary or system failure (no connection included)
  otherwise         the program's own
"""


class ClientOptions:
    """The command line's settings, 0.88's defaults."""

    def __init__(self) -> None:
        self.verbosity = 1
        self.no_delay = False
        self.remote_host = True
        self.remote_info = True
        self.ident_timeout = 26
        self.connect_timeouts = (2, 58)
        self.local_ip: str | None = None
        self.local_port = 0
        self.local_host: bytes | None = None
        self.ipv4_only = False
        self.interface = 0


def _write_stderr(message: bytes) -> None:
    try:
        os.write(2, message + b"\n")
    except OSError:
        pass


def _usage() -> None:
    _write_stderr(USAGE)
    os._exit(EXIT_PERMANENT)


def _interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0  # an unknown name: no scope, as if_nametoindex's 0 says


def apply_options(parsed: list[tuple[str, str | None]]) -> ClientOptions:
    """Letters in order, last one wins; a bad -i is the usage error, as in the original."""
    options = ClientOptions()
    for letter, value in parsed:
        text = value or ""
        if letter == "d":
            options.no_delay = False
        elif letter == "D":
            options.no_delay = True
        elif letter in "vQq":
            options.verbosity = {"v": 2, "Q": 1, "q": 0}[letter]
        elif letter in "hH":
            options.remote_host = letter == "h"
        elif letter in "rR":
            options.remote_info = letter == "r"
        elif letter == "t":
            options.ident_timeout = scan_ulong(text) % (1 << 32)  # remoteinfo's unsigned int
        elif letter == "T":
            options.connect_timeouts = parse_connect_timeouts(text)
        elif letter == "i":
            options.local_ip = ip4_scan(text) or _ipv6_literal(text)
            if options.local_ip is None:
                _usage()
        elif letter == "p":
            options.local_port = scan_ulong(text) % 65536
        elif letter == "l":
            options.local_host = os.fsencode(text)
        elif letter == "4":
            options.ipv4_only = True
        elif letter == "I":
            options.interface = _interface_index(text)
    return options


def _ipv6_literal(text: str) -> str | None:
    try:
        socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    return text


def _plain_ip(address: tuple) -> str:
    # A scoped IPv6 address comes back as `fe80::1%lo`; the variables hold the address alone.
    return str(address[0]).partition("%")[0]


def main() -> None:
    # The program gets the connection there and nothing else we might have had on them.
    for fd in (READ_FD, WRITE_FD):
        try:
            os.close(fd)
        except OSError:
            pass
    arguments = sys.argv[1:]
    if answer_help_or_version("tcpclient", arguments, HELP):
        return
    program_name = os.path.basename(sys.argv[0]) or "tcpclient"
    try:
        parsed, operands = getopt(arguments, FLAG_LETTERS, ARGUMENT_LETTERS)
    except GetoptError as error:
        _write_stderr(os.fsencode(error.message(program_name)))
        _usage()
        return
    options = apply_options(parsed)
    try:
        run(options, operands)
    except Fatal as failure:
        if options.verbosity:
            _write_stderr(failure.message)
        os._exit(failure.exit_code)


def run(options: ClientOptions, operands: list[str]) -> None:
    """Everything after the options, in 0.88's order; returns only by raising Fatal."""
    verbose = options.verbosity
    if not operands:
        _quiet_usage(verbose)
    host = operands[0]
    if len(operands) < 2:
        _quiet_usage(verbose)
    port = resolve_port(operands[1])
    if len(operands) < 3:
        _quiet_usage(verbose)
    program = [os.fsencode(argument) for argument in operands[2:]]
    addresses = resolve_host(host, options.ipv4_only)

    def warn(ip: str, port: int, error: int) -> None:
        if verbose:
            text = error_text(error).encode()
            _write_stderr(b"tcpclient: unable to connect to %s port %d: %s" % (ip.encode(), port, text))

    sock = open_connection(
        addresses,
        port,
        timeouts=options.connect_timeouts,
        local_ip=options.local_ip,
        local_port=options.local_port,
        scope=options.interface,
        warn=warn,
    )
    if sock is None:
        os._exit(EXIT_TEMPORARY)
    if options.no_delay:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # as the original: "if it fails, bummer"

    initial = read_initial_environment()
    environ = first_values(initial)
    ipv6 = sock.family == socket.AF_INET6
    changes: list[tuple[bytes, bytes | None]] = [(b"PROTO", b"TCP6" if ipv6 else b"TCP")]
    try:
        local = sock.getsockname()
    except OSError as error:
        raise fatal("unable to get local address", error) from None
    local_ip = _plain_ip(local)
    changes += [(b"TCPLOCALPORT", b"%d" % local[1]), (b"TCPLOCALIP", local_ip.encode())]
    local_host = options.local_host
    if local_host is None:
        from ucspi.client import lookups

        local_host = lookups.host_name(local_ip, environ)
    changes.append((b"TCPLOCALHOST", local_host))
    try:
        remote = sock.getpeername()
    except OSError as error:
        raise fatal("unable to get remote address", error) from None
    remote_ip = _plain_ip(remote)
    changes += [(b"TCPREMOTEPORT", b"%d" % remote[1]), (b"TCPREMOTEIP", remote_ip.encode())]
    if verbose >= 2:
        _write_stderr(b"tcpclient: connected to %s port %d" % (remote_ip.encode(), remote[1]))
    remote_host = None
    if options.remote_host:
        from ucspi.client import lookups

        remote_host = lookups.host_name(remote_ip, environ)
    changes.append((b"TCPREMOTEHOST", remote_host))
    remote_info = None
    if options.remote_info:
        from ucspi.client import lookups

        remote_info = lookups.remote_info(local_ip, local[1], remote_ip, remote[1], options.ident_timeout)
    changes.append((b"TCPREMOTEINFO", remote_info))

    _move_to_program_descriptors(sock)
    # Python ignores SIGPIPE and SIGXFSZ at start; the program gets both at their default.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    error = exec_program(program, pathexec_changes(initial, changes), environ.get(b"PATH"))
    raise fatal("unable to run " + operands[2], error)


def _quiet_usage(verbose: int) -> None:
    """The usage line after the options were read: silent under -q, as every later message."""
    if verbose:
        _write_stderr(USAGE)
    os._exit(EXIT_PERMANENT)


def _move_to_program_descriptors(sock: socket.socket) -> None:
    """The socket becomes fd 6 and its copy fd 7, both inherited; no other copy is left open."""
    fd = sock.detach()
    try:
        if fd == READ_FD:
            os.set_inheritable(fd, True)
        else:
            os.dup2(fd, READ_FD)
            os.close(fd)
    except OSError as error:
        raise fatal("unable to set up descriptor 6", error) from None
    try:
        os.dup2(READ_FD, WRITE_FD)
    except OSError as error:
        raise fatal("unable to set up descriptor 7", error) from None
