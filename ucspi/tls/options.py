"""sslserver's options: tcpserver's table plus ucspi-ssl's letters (README, sslserver; differences item 16).

The letters tcpserver has keep their meaning (-I is the interface, as in fehcom's sslserver);
the TLS letters are folded here into a TLSOptions, after tcpserver's apply_options has taken its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ucspi.numbers import scan_ulong
from ucspi.server.options import OPTION_TABLE, Option, ServerOptions

USAGE = (
    "sslserver: usage: sslserver [ -461UXpPhHrRoOdDqQvVeEsSnNzZmi3 ] [ -c limit ] [ -x rules.cdb ] [ -B banner ]"
    " [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ] [ -t timeout ] [ -I interface ]"
    " [ -T handshaketimeout ] [ -w idletimeout ] host port program"
)

TLS_TABLE: tuple[Option, ...] = (
    Option("V", None, "verbose as -v, and the `tls PID accept` line also names the protocol and cipher"),
    Option("e", None, "also set the TCP* variables (and TCP6* for an IPv6 client), as tcpserver does"),
    Option("E", None, "only the SSL* variables, no TCP* copies (default)"),
    Option("s", None, "set the mod_ssl-style SSL_* variables (SSL_PROTOCOL, SSL_CIPHER, SSL_CLIENT_S_DN, ...)"),
    Option("S", None, "no SSL_* variables (default)"),
    Option("n", None, "UCSPI-TLS: run the program on the plain connection; TLS starts when it asks (STARTTLS)"),
    Option("N", None, "TLS from the first byte; the program gets plaintext pipes (default)"),
    Option("z", None, "require a valid client certificate whose name matches the client's host name or address"),
    Option("m", None, "require a valid client certificate (any name)"),
    Option("i", None, "the same as -m (SuperScript's letter)"),
    Option("Z", None, "do not ask for a client certificate (default)"),
    Option("3", None, "read the key's password from fd 3, up to a NUL or the end"),
    Option("T", "timeout", "give up on a TLS handshake after TIMEOUT seconds in all (default 26)"),
    Option("w", "timeout", "idle TIMEOUT seconds close the program's input, TIMEOUT more the connection (3600)"),
)

# The tcpserver rows, then sslserver's; --help and the man page show them in this order.
SSL_OPTION_TABLE: tuple[Option, ...] = (*OPTION_TABLE, *TLS_TABLE)
FLAG_LETTERS = "".join(option.name for option in SSL_OPTION_TABLE if option.argument is None)
ARGUMENT_LETTERS = "".join(option.name for option in SSL_OPTION_TABLE if option.argument is not None)

# Client certificates: not asked for, required, required with the host name matching.
CLIENT_CERT_NONE = "none"
CLIENT_CERT_REQUIRED = "required"
CLIENT_CERT_MATCH = "match"


@dataclass
class TLSOptions:
    """What the TLS letters asked for, with sslserver's defaults (README, differences item 16)."""

    tcp_variables: bool = False  # -e
    ssl_variables: bool = False  # -s
    starttls: bool = False  # -n
    client_cert: str = CLIENT_CERT_NONE  # -Z / -m (-i) / -z
    password_on_fd3: bool = False  # -3
    handshake_timeout: int = 26  # -T
    idle_timeout: int = 3600  # -w
    log_cipher: bool = False  # -V


def apply_tls_options(parsed: list[tuple[str, str | None]], options: ServerOptions) -> TLSOptions:
    """The TLS letters of getopt's pairs (the last of a kind wins); -V also sets options' verbosity.

    TCP_NODELAY is on unless -d comes: what both C lineages' code does, whatever their manuals say.
    """
    tls = TLSOptions()
    no_delay = True
    for letter, argument in parsed:
        value = argument or ""
        match letter:
            case "d":
                no_delay = False
            case "D":
                no_delay = True
            case "q" | "Q" | "v":
                tls.log_cipher = False
            case "V":
                options.verbosity = 2
                tls.log_cipher = True
            case "e":
                tls.tcp_variables = True
            case "E":
                tls.tcp_variables = False
            case "s":
                tls.ssl_variables = True
            case "S":
                tls.ssl_variables = False
            case "n":
                tls.starttls = True
            case "N":
                tls.starttls = False
            case "z":
                tls.client_cert = CLIENT_CERT_MATCH
            case "m" | "i":
                tls.client_cert = CLIENT_CERT_REQUIRED
            case "Z":
                tls.client_cert = CLIENT_CERT_NONE
            case "3":
                tls.password_on_fd3 = True
            case "T":
                tls.handshake_timeout = scan_ulong(value)
            case "w":
                tls.idle_timeout = scan_ulong(value)
    options.no_delay = no_delay
    return tls
