"""tcpserver's options: one table feeds the parser, `--help` and the README (docs/behaviour.md §6.1, 6.2).

0.88's letters keep 0.88's lenient number scan (apply_options). Options that 0.88 lacks are rows
with a `parse` (README, differences item 11): long ones are `--name=value` before the host, and a value
their parser refuses is a usage error, exit 100. A new feature adds a row, a ServerOptions field
and, if no validator below fits, one more validator.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from ucspi.errors import EXIT_PERMANENT
from ucspi.numbers import scan_ulong
from ucspi.server.limits import LimitOption, parse_per_ip, parse_per_net

# The usage line of Debian's IPv6 build, whose options we have (README, differences item 6).
USAGE = (
    "tcpserver: usage: tcpserver [ -461UXpPhHrRoOdDqQv ] [ -c limit ] [ -x rules.cdb ] [ -B banner ]"
    " [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ] [ -t timeout ] [ -I interface ]"
    " host port program"
)


@dataclass(frozen=True)
class Option:
    """One row of an option table."""

    name: str  # one letter (-c) or a word (--max-per-ip)
    argument: str | None  # the value's name in --help; None: a flag, which takes no value
    help: str
    # For options 0.88 lacks: the ServerOptions field set, and the validator of the value
    # (ValueError when it does not parse). A flag sets its field to True.
    field: str | None = None
    parse: Callable[[str], object] | None = None

    @property
    def is_long(self) -> bool:
        return len(self.name) > 1

    @property
    def spelling(self) -> str:
        return f"--{self.name}" if self.is_long else f"-{self.name}"


# 0.88's letters (and the IPv6 build's -4 -6 -I), in the man page's order.
OPTION_TABLE: tuple[Option, ...] = (
    Option("q", None, "quiet: no messages at all, not even errors"),
    Option("Q", None, "print error messages (default)"),
    Option("v", None, "verbose: also status, pid, ok/deny and end lines"),
    Option("1", None, "after binding, print the local port number on stdout"),
    Option("c", "limit", "serve at most LIMIT clients at once (default 40); others wait in the backlog"),
    Option("x", "rules.cdb", "decide each client by the rules in this cdb (made by tcprules)"),
    Option("X", None, "with -x: a missing rules file means no rules, not a dropped client"),
    Option("B", "banner", "write BANNER to each client before anything else"),
    Option("g", "gid", "switch to this group id (and only it) after binding"),
    Option("u", "uid", "switch to this user id after binding"),
    Option("U", None, "take the uid and gid from $UID and $GID"),
    Option("b", "backlog", "allow up to BACKLOG pending connections (default 20)"),
    Option("o", None, "leave IP options alone"),
    Option("O", None, "kill IP options (default; a no-op on Linux, as in the original)"),
    Option("d", None, "delay small packets (default)"),
    Option("D", None, "never delay small packets (TCP_NODELAY)"),
    Option("h", None, "look up the client's host name in DNS for TCPREMOTEHOST (default)"),
    Option("H", None, "no host name lookup"),
    Option("p", None, "paranoid: keep the host name only if it resolves back to the client's address"),
    Option("P", None, "not paranoid (default)"),
    Option("l", "localname", "use LOCALNAME for TCPLOCALHOST instead of looking it up in DNS"),
    Option("r", None, "ask the client's identd for TCPREMOTEINFO (default)"),
    Option("R", None, "no ident lookup"),
    Option("t", "timeout", "give up on the ident lookup after TIMEOUT seconds (default 26)"),
    Option("4", None, "IPv4 only: a host name is looked up for its IPv4 address alone (host 0 is 0.0.0.0 anyway)"),
    Option("6", None, "present IPv4 clients on an IPv6 socket as IPv6 (::ffff:a.b.c.d, PROTO=TCP6)"),
    Option("I", "interface", "the interface (scope) of a link-local address to listen on"),
    # Not 0.88's: ipsvd's and s6's letter for the per-address limit (same as --max-per-ip).
    Option(
        "C",
        "n[:msg]",
        "at most N connections at once from one address; the next gets MSG (\\n \\r \\\\ escapes)",
        field="max_per_ip",
        parse=parse_per_ip,
    ),
)

# `--name=value` options, 0.88 has none: the features to come add their rows here.
LONG_OPTIONS: tuple[Option, ...] = (
    Option(
        "max-per-ip",
        "n[:msg]",
        "at most N connections at once from one address (as -C); MAXCONNIP in a rule overrides",
        field="max_per_ip",
        parse=parse_per_ip,
    ),
    Option(
        "max-per-net",
        "n[/len4[/len6]][:msg]",
        "at most N connections at once from one network (default /24 and /64); MAXCONNC overrides",
        field="max_per_net",
        parse=parse_per_net,
    ),
    # The proxy rows' validators are defined below this table, hence the lambdas.
    Option(
        "proxy-from",
        "cidr[,cidr...]",
        "read a PROXY header from these peers (and only these; 0.0.0.0/0 and ::/0 must be written out)",
        field="proxy_from",
        parse=lambda text: cidr_list(text),
    ),
    Option(
        "proxy",
        "v1|v2|any",
        "with --proxy-from: the header versions accepted (default any)",
        field="proxy_version",
        parse=lambda text: keyword(("v1", "v2", "any"))(text),
    ),
    Option(
        "proxy-timeout",
        "secs",
        "with --proxy-from: drop a listed peer whose header is not complete after SECS (default 5)",
        field="proxy_timeout",
        parse=lambda text: positive_seconds(text),
    ),
    Option(
        "proxy-local",
        "serve|close",
        "with --proxy-from: serve a LOCAL/UNKNOWN header (a health check) with the real endpoints, or close it",
        field="proxy_local",
        parse=lambda text: keyword(("serve", "close"))(text),
    ),
    Option(
        "proxy-ident",
        None,
        "with --proxy-from: ask the proxied client's identd too (off: it cannot know the balancer's connection)",
        field="proxy_ident",
    ),
    Option(
        "inherit",
        "stdin",
        "serve the listening socket on fd 0 (s6-tcpserver-socketbinder style) instead of binding",
        field="inherit",
        parse=lambda text: keyword(("stdin",))(text),
    ),
    Option(
        "drain",
        "secs",
        "TERM drains as ALRM does: stop accepting, wait up to SECS for the programs, then TERM+CONT, KILL 2 s later",
        field="drain",
        parse=lambda text: seconds()(text),
    ),
    Option(
        "log",
        "classic|logfmt|json",
        "the log's format: classic (the original's lines, the default), logfmt or json, one event a line",
        field="log_format",
        parse=lambda text: keyword(("classic", "logfmt", "json"))(text),
    ),
    Option(
        "status-socket",
        "path",
        "serve the status view as JSON lines to each client of this UNIX socket (mode 0600), then close",
        field="status_socket",
        parse=lambda text: socket_path(text),
    ),
)

FLAG_LETTERS = "".join(option.name for option in OPTION_TABLE if option.argument is None)
ARGUMENT_LETTERS = "".join(option.name for option in OPTION_TABLE if option.argument is not None)


class UnknownOption(Exception):
    """A `--name` no row of the table has: a usage error, as an illegal letter is."""

    def __init__(self, spelling: str) -> None:
        super().__init__(spelling)
        self.spelling = spelling

    def message(self, program_name: str) -> bytes:
        return os.fsencode(f"{program_name}: illegal option {self.spelling}")


class BadValue(Exception):
    """A new option's value missing or refused by its validator: `bad value for --NAME: VALUE`."""

    exit_code = EXIT_PERMANENT

    def __init__(self, spelling: str, value: str) -> None:
        super().__init__(spelling, value)
        self.spelling = spelling
        self.value = value

    @property
    def message(self) -> bytes:
        return self.message_for("tcpserver")

    def message_for(self, command_name: str) -> bytes:
        """The line under the command's own name (sslserver's too)."""
        return os.fsencode(f"{command_name}: fatal: bad value for {self.spelling}: {self.value}")


# ---- validators for new options: each takes the text and returns the value, or raises ValueError

_DECIMAL = re.compile(r"[0-9]+")
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def integer(minimum: int = 0, maximum: int = (1 << 63) - 1) -> Callable[[str], int]:
    """Plain ASCII decimal digits (no sign, space or `_`) making a number in [minimum, maximum]."""

    def parse(text: str) -> int:
        # More digits than the maximum has is out of range at once: no int() of a huge string.
        if not _DECIMAL.fullmatch(text) or len(text.lstrip("0")) > len(str(maximum)):
            raise ValueError(text)
        number = int(text)
        if not minimum <= number <= maximum:
            raise ValueError(text)
        return number

    return parse


def seconds(maximum: float = 86400.0) -> Callable[[str], float]:
    """A duration: digits with an optional decimal fraction (`5`, `0.25`), at most maximum."""

    def parse(text: str) -> float:
        if not _SECONDS.fullmatch(text) or len(text.partition(".")[0].lstrip("0")) > len(str(int(maximum))):
            raise ValueError(text)
        duration = float(text)
        if duration > maximum:
            raise ValueError(text)
        return duration

    return parse


def keyword(choices: Collection[str]) -> Callable[[str], str]:
    """One word of a fixed set, spelt exactly."""
    allowed = frozenset(choices)

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(text)
        return text

    return parse


def positive_seconds(text: str) -> float:
    """A duration above zero."""
    duration = seconds()(text)
    if duration <= 0:
        raise ValueError(text)
    return duration


def cidr_list(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`CIDR[,CIDR...]`: networks with no host bits set (`10.0.0.0/8`); a bare address is /32 or /128."""
    if not text:
        raise ValueError(text)
    networks = []
    for part in text.split(","):
        # ipaddress allows what a trust list should not: spaces around, and a netmask for a length.
        if not part or part != part.strip() or ("/" in part and not _DECIMAL.fullmatch(part.partition("/")[2])):
            raise ValueError(text)
        networks.append(ipaddress.ip_network(part, strict=True))
    return tuple(networks)


def socket_path(text: str) -> bytes:
    """A UNIX socket's path: not empty, and short enough for sun_path (107 bytes and a NUL)."""
    path = os.fsencode(text)
    if not path or len(path) > 107 or b"\0" in path:
        raise ValueError(text)
    return path


# ---- the options themselves


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
    max_per_ip: LimitOption | None = None
    max_per_net: LimitOption | None = None
    # PROXY protocol (issue 12): None = not given; the others need proxy_from.
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    proxy_version: str | None = None  # v1, v2 or any (the default)
    proxy_timeout: float | None = None  # seconds, 5 by default
    proxy_local: str | None = None  # serve (the default) or close
    proxy_ident: bool = False
    inherit: str | None = None  # stdin: the listener is fd 0 (s6); None: bind, or systemd's sockets
    # Operations (issue 13): None = TERM exits at once as 0.88's (ALRM drains for 30 s).
    drain: float | None = None
    # TERM's drain deadline when --drain is not given (sslserver's serving child: none); None: TERM as above.
    term_drain: float | None = None
    log_format: str = "classic"
    status_socket: bytes | None = None
    operands: list[str] = field(default_factory=list)


def _table_value(option: Option, spelling: str, value: str | None) -> object:
    """A new option's value as its row parses it; BadValue when missing, refused, or given to a flag."""
    if option.parse is None:
        if value is not None:
            raise BadValue(spelling, value)
        return True
    if value is None:
        raise BadValue(spelling, "")
    try:
        return option.parse(value)
    except ValueError:
        raise BadValue(spelling, value) from None


def apply_options(
    parsed: list[tuple[str, str | None]],
    environ: dict[bytes, bytes],
    table: Sequence[Option] = OPTION_TABLE + LONG_OPTIONS,
) -> ServerOptions:
    """Fold getopt's (letter or `--name`, argument) pairs into ServerOptions; the last of a kind wins.

    Raises UnknownOption or BadValue for a new option (a row with a field) it cannot take.
    """
    rows = {option.spelling: option for option in table}
    options = ServerOptions()
    for letter, argument in parsed:
        spelling = letter if letter.startswith("--") else "-" + letter
        row = rows.get(spelling)
        if row is None and spelling.startswith("--"):
            raise UnknownOption(spelling)
        if row is not None and row.field is not None:
            setattr(options, row.field, _table_value(row, spelling, argument))
            continue
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
                pass  # -O's setsockopt is IP_TOS with no value on Linux: a no-op (docs/behaviour.md §6.2)
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
