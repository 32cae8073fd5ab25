"""sslserver [opts] host port program [args...]: tcpserver with TLS in front of the program (README, sslserver).

The command is tcpserver's (ucspi/cli/tcpserver.py) with another description: its letters, its
usage line, its log name, the certificates loaded once before the listeners, and its connection
class (ucspi/tls/connection.py).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

# Only what the split needs is imported before it: the supervised parent stays small.
from ucspi.cli.standard_fds import open_closed_standard_descriptors
from ucspi.tls.detach import Child, split

if TYPE_CHECKING:
    from ucspi.cli.tcpserver import Command
    from ucspi.server.log import Log
    from ucspi.server.options import ServerOptions
    from ucspi.tls.options import TLSOptions


def help_text() -> str:
    """--help, from the option tables (as tcpserver's)."""
    import click

    from ucspi.cli.tcpserver import option_rows
    from ucspi.server.options import LONG_OPTIONS
    from ucspi.tls.options import SSL_OPTION_TABLE

    formatter = click.HelpFormatter()
    formatter.write_usage("sslserver", "[options] host port program [args...]")
    formatter.write_paragraph()
    formatter.write_text(
        "Listen on HOST (0 for all addresses) and PORT; for each client, apply the rules and limits, do the"
        " TLS handshake with the certificate of $CERTFILE (key: $KEYFILE), then run PROGRAM with the"
        " plaintext on descriptors 0 and 1 and PROTO=SSL, SSLREMOTEIP and the rest in its environment."
    )
    with formatter.section("Options"):
        formatter.write_dl(option_rows(SSL_OPTION_TABLE))
    with formatter.section("Long options (before the host)"):
        formatter.write_dl(option_rows(LONG_OPTIONS))
    with formatter.section("Environment read"):
        formatter.write_dl(
            [
                ("CERTFILE", "the server's certificate (PEM, may hold the chain)"),
                ("KEYFILE", "its key; empty or unset: the key is in CERTFILE"),
                ("CAFILE, CADIR", "trust anchors for client certificates (-m, -z)"),
                ("CIPHERS", "OpenSSL cipher list for TLS 1.2; empty: the library's default"),
                ("DHFILE", "DH parameters (for DHE suites)"),
                ("CERTFILE:name, KEYFILE:name", "the pair for the SNI name NAME (s6's names; *.domain allowed)"),
            ]
        )
    with formatter.section("Exit codes"):
        formatter.write_dl(
            [
                # The process started exits once the serving child has closed its listeners (README, Stopping).
                ("0", "at SIGTERM, SIGHUP, SIGINT or SIGALRM, once the listeners are closed; the sessions go on"),
                ("100", "usage error"),
                ("111", "temporary or system failure, a certificate or key not loaded, the serving child lost"),
            ]
        )
    return formatter.getvalue()


# Set in the serving child of the start-up split (ucspi/tls/detach.py); None: one process.
_child: Child | None = None
# TERM drains the child with no deadline unless --drain gives one: sessions go on to their end.
# ALRM drains as tcpserver's: --drain's deadline, else 30 s.
_NO_DEADLINE = 10 * 365 * 86400.0


def _configure(parsed: list[tuple[str, str | None]], options: ServerOptions) -> TLSOptions:
    from ucspi.tls.options import apply_tls_options

    if _child is not None:
        options.term_drain = _NO_DEADLINE
    return apply_tls_options(parsed, options)


def _start(options: ServerOptions, extra: object, environ: dict[bytes, bytes], log: Log) -> type:
    """Before the listeners and the privilege drop: the password (-3), the certificates, once."""
    from ucspi.errors import EXIT_TEMPORARY, Fatal
    from ucspi.tls.connection import TLSConnection
    from ucspi.tls.context import load, read_password_fd3
    from ucspi.tls.options import TLSOptions

    assert isinstance(extra, TLSOptions)
    if _child is not None:
        _child.adopt(environ)  # systemd's sockets are the parent's pid's; READY and STOPPING go through it
        _child.watch_lifeline()
    password = None
    if extra.password_on_fd3:
        if options.inherit is None and environ.get(b"LISTEN_PID") == b"%d" % os.getpid() and environ.get(b"LISTEN_FDS"):
            raise Fatal("sslserver: fatal: -3 with inherited listeners: fd 3 is a listener", EXIT_TEMPORARY)
        password = read_password_fd3()
    setup = load(extra, environ, password)

    class Bound(TLSConnection):
        __slots__ = ()

    Bound.setup = setup
    return Bound


def command() -> Command:
    """sslserver's description for tcpserver's main and serve."""
    from ucspi.cli.tcpserver import Command
    from ucspi.tls.options import SSL_OPTION_TABLE, USAGE

    return Command("sslserver", USAGE, SSL_OPTION_TABLE, _configure, _start)


def main() -> None:
    # The native launcher's marker (spawn.take_launcher_marker) is no argument of the user's.
    arguments = [argument for argument in sys.argv[1:2] if not argument.startswith("--ucspi-launcher=")] + sys.argv[2:]
    if arguments == ["--help"]:
        _write_stdout(help_text().encode())
        return
    if arguments == ["--version"]:
        from ucspi.cli import version_line

        _write_stdout(version_line("sslserver"))
        return
    global _child
    # Before the split: fds 0-2 that came closed must not be taken by its pipes.
    open_closed_standard_descriptors()
    _child = split()  # the parent supervises and never returns
    from ucspi.cli import tcpserver
    from ucspi.server.options import LONG_OPTIONS

    tcpserver.main(LONG_OPTIONS, command())


def _write_stdout(data: bytes) -> None:
    try:
        os.write(1, data)
    except OSError:
        pass
