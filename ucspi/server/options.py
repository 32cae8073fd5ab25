"""tcpserver's options: one table feeds the parser, `--help` and the README (spec 6.1, 6.2)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ucspi.cli.getopt import scan_ulong

# The usage line of Debian's IPv6 build, whose options we have (differences item 6).
USAGE = (
    "tcpserver: usage: tcpserver [ -461UXpPhHrRoOdDqQv ] [ -c limit ] [ -x rules.cdb ] [ -B banner ]"
    " [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ] [ -t timeout ] [ -I interface ]"
    " host port program"
)

# (letter, argument name or None, help). Order is the man page's.
OPTION_TABLE: tuple[tuple[str, str | None, str], ...] = (
    ("q", None, "quiet: no messages at all, not even errors"),
    ("Q", None, "print error messages (default)"),
    ("v", None, "verbose: also status, pid, ok/deny and end lines"),
    ("1", None, "after binding, print the local port number on stdout"),
    ("c", "limit", "serve at most LIMIT clients at once (default 40); others wait in the backlog"),
    ("x", "rules.cdb", "decide each client by the rules in this cdb (made by tcprules)"),
    ("X", None, "with -x: a missing rules file means no rules, not a dropped client"),
    ("B", "banner", "write BANNER to each client before anything else"),
    ("g", "gid", "switch to this group id (and only it) after binding"),
    ("u", "uid", "switch to this user id after binding"),
    ("U", None, "take the uid and gid from $UID and $GID"),
    ("b", "backlog", "allow up to BACKLOG pending connections (default 20)"),
    ("o", None, "leave IP options alone"),
    ("O", None, "kill IP options (default; a no-op on Linux, as in the original)"),
    ("d", None, "delay small packets (default)"),
    ("D", None, "never delay small packets (TCP_NODELAY)"),
    ("h", None, "look up the client's host name in DNS for TCPREMOTEHOST (default)"),
    ("H", None, "no host name lookup"),
    ("p", None, "paranoid: keep the host name only if it resolves back to the client's address"),
    ("P", None, "not paranoid (default)"),
    ("l", "localname", "use LOCALNAME for TCPLOCALHOST instead of looking it up in DNS"),
    ("r", None, "ask the client's identd for TCPREMOTEINFO (default)"),
    ("R", None, "no ident lookup"),
    ("t", "timeout", "give up on the ident lookup after TIMEOUT seconds (default 26)"),
    ("4", None, "IPv4 only: host 0 listens on 0.0.0.0 instead of IPv4 and IPv6"),
    ("6", None, "present IPv4 clients on an IPv6 socket as IPv6 (::ffff:a.b.c.d, PROTO=TCP6)"),
    ("I", "interface", "the interface (scope) of a link-local address to listen on"),
)

FLAG_LETTERS = "".join(letter for letter, argument, _ in OPTION_TABLE if argument is None)
ARGUMENT_LETTERS = "".join(letter for letter, argument, _ in OPTION_TABLE if argument is not None)


@dataclass
class ServerOptions:
    """What the command line asked for, with 0.88's defaults."""

    verbosity: int = 1
    limit: int = 40
    rules_path: bytes | None = None
    allow_missing_rules: bool = False
    banner: bytes = b""
    gid: int = 0
    uid: int = 0
    backlog: int = 20
    no_delay: bool = False
    remote_host: bool = True
    paranoid: bool = False
    local_host: bytes | None = None
    remote_info: bool = True
    ident_timeout: int = 26
    print_port: bool = False
    ipv4_only: bool = False
    mapped_as_ipv6: bool = False
    interface: bytes | None = None
    operands: list[str] = field(default_factory=list)


def apply_options(parsed: list[tuple[str, str | None]], environ: dict[bytes, bytes]) -> ServerOptions:
    """Fold getopt's (letter, argument) pairs into ServerOptions; the last of a kind wins."""
    options = ServerOptions()
    for letter, argument in parsed:
        value = argument or ""
        match letter:
            case "q":
                options.verbosity = 0
            case "Q":
                options.verbosity = 1
            case "v":
                options.verbosity = 2
            case "1":
                options.print_port = True
            case "c":
                options.limit = scan_ulong(value)
            case "x":
                options.rules_path = os.fsencode(value)
            case "X":
                options.allow_missing_rules = True
            case "B":
                options.banner = os.fsencode(value)
            case "g":
                options.gid = scan_ulong(value)
            case "u":
                options.uid = scan_ulong(value)
            case "U":
                if b"UID" in environ:
                    options.uid = scan_ulong(os.fsdecode(environ[b"UID"]))
                if b"GID" in environ:
                    options.gid = scan_ulong(os.fsdecode(environ[b"GID"]))
            case "b":
                options.backlog = scan_ulong(value)
            case "o" | "O":
                pass  # -O's setsockopt is IP_TOS with no value on Linux: a no-op (spec 6.2)
            case "d":
                options.no_delay = False
            case "D":
                options.no_delay = True
            case "h":
                options.remote_host = True
            case "H":
                options.remote_host = False
            case "p":
                options.paranoid = True
            case "P":
                options.paranoid = False
            case "l":
                options.local_host = os.fsencode(value)
            case "r":
                options.remote_info = True
            case "R":
                options.remote_info = False
            case "t":
                options.ident_timeout = scan_ulong(value)
            case "4":
                options.ipv4_only = True
            case "6":
                options.mapped_as_ipv6 = True
            case "I":
                options.interface = os.fsencode(value)
    return options
