"""The command line: usage, getopt errors, bundled and attached forms, --help, host and port
errors (docs/behaviour.md §6.1, 6.3, 6.4; README, differences item 4)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from scenarios import bundled_options, command_line, port_in_use
from serverproc import ORIGINAL_SERVER, OUR_SERVER, TOP, Implementation, original_available, start_server, talk

from ucspi.cli.getopt import getopt
from ucspi.numbers import scan_ulong
from ucspi.server.options import (
    LONG_OPTIONS,
    OPTION_TABLE,
    BadValue,
    Option,
    ServerOptions,
    UnknownOption,
    apply_options,
    cidr_list,
    integer,
    keyword,
    seconds,
)

# Ours is the usage line of Debian's IPv6 build (README, differences item 6); the 0.88 one differs.
USAGE = (
    b"tcpserver: usage: tcpserver [ -461UXpPhHrRoOdDqQv ] [ -c limit ] [ -x rules.cdb ] [ -B banner ]"
    b" [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ] [ -t timeout ] [ -I interface ] host port program"
)
ORIGINAL_USAGE = (
    b"tcpserver: usage: tcpserver [ -1UXpPhHrRoOdDqQv ] [ -c limit ] [ -x rules.cdb ] [ -B banner ]"
    b" [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ] [ -t timeout ] host port program"
)

# (arguments, exit code, stderr lines): shared with tests/compat/test_tcpserver_compat.py.
COMMAND_LINES = [
    pytest.param([], 100, [USAGE], id="nothing"),
    pytest.param(["0"], 100, [USAGE], id="host-only"),
    pytest.param(["0", "0"], 100, [USAGE], id="no-program"),
    pytest.param(["-q", "0", "0"], 100, [], id="quiet-usage"),
    pytest.param(["-Z", "0", "0", "true"], 100, [b"tcpserver: illegal option -- Z", USAGE], id="illegal"),
    pytest.param(["-qZ", "0", "0", "true"], 100, [b"tcpserver: illegal option -- Z", USAGE], id="illegal-quiet"),
    pytest.param(["-c"], 100, [b"tcpserver: option requires an argument -- c", USAGE], id="missing-argument"),
    pytest.param(["-vx"], 100, [b"tcpserver: option requires an argument -- x", USAGE], id="missing-bundled"),
    pytest.param(
        ["-HRl0", "127.0.0.1", "nonexistentport", "true"],
        111,
        [b"tcpserver: fatal: unable to figure out port number for nonexistentport"],
        id="bad-port",
    ),
    pytest.param(
        ["-HRl0", "127.0.0.1", "12abc", "true"],
        111,
        [b"tcpserver: fatal: unable to figure out port number for 12abc"],
        id="port-with-junk",
    ),
    pytest.param(["-HRl0", "127.1", "0", "true"], 111, [b"tcpserver: fatal: no IP address for 127.1"], id="short-ip"),
    pytest.param(["-qHRl0", "127.1", "0", "true"], 111, [], id="short-ip-quiet"),
]


@pytest.mark.parametrize(("arguments", "code", "stderr"), COMMAND_LINES)
def test_command_line_errors(arguments: list[str], code: int, stderr: list[bytes]) -> None:
    outcome = command_line(OUR_SERVER, arguments)
    assert (outcome.exit_code, outcome.log, outcome.replies) == (code, stderr, [b""])


def test_getopt_names_itself_after_argv0(tmp_path: Path) -> None:
    link = tmp_path / "myserver"
    link.symlink_to(OUR_SERVER.command)
    outcome = command_line(OUR_SERVER.__class__("link", link, link), ["-Z"])
    assert outcome.log == [b"myserver: illegal option -- Z", USAGE]


def test_help_goes_to_stdout_and_exits_0() -> None:
    """README, differences item 4."""
    outcome = command_line(OUR_SERVER, ["--help"])
    assert outcome.exit_code == 0
    assert outcome.log == []
    assert outcome.replies[0].startswith(b"Usage: tcpserver")


def test_help_gives_todays_exit_codes() -> None:
    """0 at TERM and at a drain's end (README, Exit codes), not the 0.88 text `0 SIGTERM`."""
    text = command_line(OUR_SERVER, ["--help"]).replies[0]
    codes = re.sub(rb"\s+", b" ", text.split(b"Exit codes:\n", 1)[1]).strip()
    assert codes == (
        b"0 at SIGTERM (at once), or at the end of a drain (SIGALRM; SIGTERM with --drain) "
        b"100 usage error 111 temporary or system failure"
    )


def test_address_already_used() -> None:
    outcome = port_in_use(OUR_SERVER)
    assert (outcome.exit_code, outcome.log) == (111, [b"tcpserver: fatal: unable to bind: address already used"])


def test_bundled_and_attached_forms(tmp_path: Path) -> None:
    outcome = bundled_options(OUR_SERVER, tmp_path)
    assert outcome.replies == [b"hi -v"]
    assert outcome.log == [
        b"tcpserver: status: 0/5",
        b"tcpserver: status: 1/5",
        b"tcpserver: pid PID from 127.0.0.1",
        b"tcpserver: ok PID local:127.0.0.1:PORT :127.0.0.1::PORT",
        b"tcpserver: end PID status 0",
        b"tcpserver: status: 0/5",
    ]


# ---- one scan_ulong for every number (ucspi/numbers.py): 0.88's options wrap at 2**64 ----

# 10**64 is a multiple of 2**64, so a 1 followed by 4,999 digits is congruent to its last 64.
WRAPS_TO_5 = "1" + "0" * 4998 + "5"
WRAPS_TO_MAX = "1" + "0" * (4999 - 20) + str((1 << 64) - 1)


@pytest.mark.parametrize(("limit", "status"), [(WRAPS_TO_5, b"0/5"), (WRAPS_TO_MAX, b"0/18446744073709551615")])
@pytest.mark.parametrize("implementation", [OUR_SERVER, ORIGINAL_SERVER], ids=["ours", "original"])
def test_limit_of_5000_digits_wraps_as_the_original(implementation: Implementation, limit: str, status: bytes) -> None:
    if implementation is ORIGINAL_SERVER and not original_available():
        pytest.skip("the original tcpserver is not installed")
    assert len(limit) == 5000
    with start_server(implementation.command, ["-v", "-HRl0", "-c", limit], ["/bin/true"]) as server:
        assert server.wait_for_log("^tcpserver: status: ") == [b"tcpserver: status: " + status]


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("", 0),
        ("abc", 0),
        ("12abc", 12),
        ("007", 7),
        ("18446744073709551615", (1 << 64) - 1),
        ("18446744073709551616", 0),
        ("18446744073709551621x", 5),
        ("\u0661\u0662", 0),  # Arabic-Indic digits: djb's test is 0-9 only
        (WRAPS_TO_5, 5),
        (WRAPS_TO_MAX, (1 << 64) - 1),
        ("9" * 100_000, (10**100_000 - 1) % (1 << 64)),
    ],
    ids=[
        "empty",
        "letters",
        "junk-after",
        "zeros",
        "max",
        "wraps",
        "wraps-junk",
        "other-digits",
        "5000",
        "5000-max",
        "100k",
    ],
)
def test_scan_ulong(text: str, number: int) -> None:
    assert scan_ulong(text) == number
    assert scan_ulong(os.fsencode(text)) == number


def test_nothing_outside_the_cli_imports_the_cli() -> None:
    importers = [
        path
        for path in (TOP / "ucspi").rglob("*.py")
        if path.parent.name != "cli" and re.search(r"^\s*(from|import) ucspi\.cli\b", path.read_text(), re.MULTILINE)
    ]
    assert importers == []


# ---- long options (differences items 4 and 11) ----

LONG_COMMAND_LINES = [
    pytest.param(["--bogus=1", "0", "0", "true"], [b"tcpserver: illegal option --bogus", USAGE], id="unknown"),
    pytest.param(
        ["-q", "--bogus", "0", "0", "true"], [b"tcpserver: illegal option --bogus", USAGE], id="unknown-quiet"
    ),
    pytest.param(["-v", "--help"], [b"tcpserver: illegal option --help", USAGE], id="help-not-alone"),
    pytest.param(["--version", "-v"], [b"tcpserver: illegal option --version", USAGE], id="version-not-alone"),
]


@pytest.mark.parametrize(("arguments", "stderr"), LONG_COMMAND_LINES)
def test_unknown_long_option_is_a_usage_error(arguments: list[str], stderr: list[bytes]) -> None:
    outcome = command_line(OUR_SERVER, arguments)
    assert (outcome.exit_code, outcome.log, outcome.replies) == (100, stderr, [b""])


def test_version_goes_to_stdout_and_exits_0() -> None:
    outcome = command_line(OUR_SERVER, ["--version"])
    assert (outcome.exit_code, outcome.log) == (0, [])
    assert re.fullmatch(rb"tcpserver \(ucspi\) [0-9][0-9A-Za-z.+-]*, spawn: [a-z_ ()]+\n", outcome.replies[0])


def test_long_option_after_the_host_is_the_programs() -> None:
    with start_server(OUR_SERVER.command, ["-HRl0"], ["/bin/echo", "--bogus=1"]) as server:
        assert talk(server.port) == b"--bogus=1\n"


# Rows like the ones the features to come add (issues 11 and 12), for the real command too.
_SAMPLE_ROWS_SOURCE = """(
    Option("max-per-ip", "n", "at most N clients from one address", "limit", integer(1, 1000)),
    Option("proxy-timeout", "secs", "give up on the header after SECS", "ident_timeout", seconds(3600)),
    Option("proxy", "v1|v2|any", "the PROXY versions read", "banner", keyword({"v1", "v2", "any"})),
    Option("proxy-from", "cidr,...", "the only sources whose header is read", "rules_path", cidr_list),
    Option("proxy-ident", None, "ask a proxied client's identd too", "paranoid"),
)"""
SAMPLE_ROWS: tuple[Option, ...] = eval(_SAMPLE_ROWS_SOURCE)  # our own literal, shared with the command
_WITH_SAMPLE_ROWS = f"""
import sys
sys.argv[0] = "tcpserver"
from ucspi.cli.tcpserver import main
from ucspi.server.options import Option, cidr_list, integer, keyword, seconds
main(long_options={_SAMPLE_ROWS_SOURCE})
"""


def _with_sample_rows(arguments: list[str]) -> subprocess.CompletedProcess[bytes]:
    python = TOP / ".venv" / "bin" / "python"
    return subprocess.run(
        [python, "-c", _WITH_SAMPLE_ROWS, *arguments], capture_output=True, timeout=20, env={"PATH": "/usr/bin:/bin"}
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--max-per-ip=0"], b"--max-per-ip: 0"),
        (["--max-per-ip=1001"], b"--max-per-ip: 1001"),
        (["--max-per-ip=5x"], b"--max-per-ip: 5x"),
        (["--max-per-ip=" + "9" * 5000], b"--max-per-ip: " + b"9" * 5000),
        (["--max-per-ip"], b"--max-per-ip: "),
        (["--max-per-ip="], b"--max-per-ip: "),
        (["-v", "--proxy-timeout=1e3"], b"--proxy-timeout: 1e3"),
        (["--proxy=v3"], b"--proxy: v3"),
        (["--proxy-from=10.0.0.1/8"], b"--proxy-from: 10.0.0.1/8"),
        (["-q", "--proxy-from=10.0.0.0/8,"], b"--proxy-from: 10.0.0.0/8,"),
        (["--proxy-ident=yes"], b"--proxy-ident: yes"),
    ],
    ids=[
        "zero",
        "over",
        "junk",
        "5000-digits",
        "no-equals",
        "empty",
        "exponent",
        "keyword",
        "host-bits",
        "trailing-comma",
        "flag-with-value",
    ],
)
def test_bad_value_of_a_long_option(arguments: list[str], message: bytes) -> None:
    finished = _with_sample_rows([*arguments, "-HRl0", "127.0.0.1", "0", "/bin/true"])
    assert (finished.returncode, finished.stderr, finished.stdout) == (
        100,
        b"tcpserver: fatal: bad value for " + message + b"\n",
        b"",
    )


def test_good_long_options_do_not_end_the_options() -> None:
    arguments = ["--max-per-ip=3", "-v", "--proxy-from=127.0.0.0/8,::1", "--proxy-ident", "-HRl0", "127.1", "0", "true"]
    finished = _with_sample_rows(arguments)
    # -v after them was read, and the host was reached: 127.1 is no IP address (docs/behaviour.md §6.3).
    assert (finished.returncode, finished.stderr) == (111, b"tcpserver: fatal: no IP address for 127.1\n")


def test_long_options_are_in_help_and_not_in_usage() -> None:
    help_text = _with_sample_rows(["--help"]).stdout
    assert b"--max-per-ip=n" in help_text and b"--proxy-ident " in help_text
    finished = _with_sample_rows(["-Z"])
    assert finished.stderr.splitlines()[1] == USAGE


def _apply(arguments: list[str], table: tuple[Option, ...] = OPTION_TABLE + SAMPLE_ROWS) -> ServerOptions:
    letters = "".join(option.name for option in table if not option.is_long and option.argument is None)
    with_argument = "".join(option.name for option in table if not option.is_long and option.argument)
    parsed, operands = getopt(arguments, letters, with_argument, long_options=True)
    assert operands == ["host"]
    return apply_options(parsed, {}, table)


def test_long_options_set_their_fields_in_order_with_the_letters() -> None:
    options = _apply(["-c5", "--max-per-ip=7", "--proxy-timeout=2.5", "--proxy=v2", "--proxy-ident", "host"])
    assert (options.limit, options.ident_timeout, options.banner, options.paranoid) == (7, 2.5, "v2", True)
    assert _apply(["--max-per-ip=7", "-c5", "host"]).limit == 5  # the last of a kind wins
    networks = _apply(["--proxy-from=127.0.0.1,::1/128,10.0.0.0/8", "host"]).rules_path
    assert [str(network) for network in networks] == ["127.0.0.1/32", "::1/128", "10.0.0.0/8"]


def test_a_new_short_option_validates_its_value() -> None:
    table = (*OPTION_TABLE, Option("n", "count", "a new letter", "limit", integer(1, 9)))
    assert _apply(["-vn3", "host"], table).limit == 3
    with pytest.raises(BadValue) as raised:
        _apply(["-n", "10", "host"], table)
    assert raised.value.message == b"tcpserver: fatal: bad value for -n: 10"
    assert _apply(["-c", "10x", "host"], table).limit == 10  # 0.88's own letters stay lenient


def test_unknown_long_option_raises() -> None:
    with pytest.raises(UnknownOption) as raised:
        _apply(["--max-per-net=1", "host"])
    assert raised.value.message("myserver") == b"myserver: illegal option --max-per-net"


def test_getopt_takes_long_options_only_where_asked() -> None:
    assert getopt(["--x=1", "-v", "h"], "v", "") == ([], ["-v", "h"])  # 0.88: any -- ends the options
    assert getopt(["--x=1", "-v", "--y", "--", "-v"], "v", "", long_options=True) == (
        [("--x", "1"), ("v", None), ("--y", None)],
        ["-v"],
    )
    assert getopt(["--x=a=b", "h"], "", "", long_options=True) == ([("--x", "a=b")], ["h"])


@pytest.mark.parametrize(
    ("validator", "good", "bad"),
    [
        (
            integer(0, 65535),
            {"0": 0, "65535": 65535, "00012": 12},
            ["", "-1", "+1", " 1", "1 ", "1_000", "65536", "\u0661", "9" * 5000],
        ),
        (
            seconds(60),
            {"0": 0.0, "5": 5.0, "0.25": 0.25, "60": 60.0},
            ["", ".5", "5.", "1e1", "inf", "nan", "60.5", "-1"],
        ),
        (keyword({"v1", "v2"}), {"v1": "v1"}, ["", "V1", "v1 ", "v3"]),
    ],
    ids=["integer", "seconds", "keyword"],
)
def test_validators(validator: Callable[[str], object], good: dict[str, object], bad: list[str]) -> None:
    assert {text: validator(text) for text in good} == good
    for text in bad:
        with pytest.raises(ValueError):
            validator(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ",",
        "10.0.0.0/8,",
        "10.0.0.1/8",
        "10.0.0.0/33",
        "10.0.0.0/255.0.0.0",
        " 10.0.0.0/8",
        "10.0.0.0/ 8",
        "10.0.0.0/+8",
        "::1/129",
        "host.example",
        "10.0.0.0/8;1.2.3.4",
    ],
)
def test_cidr_list_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        cidr_list(text)


def test_every_long_option_row_sets_a_server_option() -> None:
    fields = {name for name in ServerOptions.__dataclass_fields__}
    assert all(option.is_long and option.field in fields for option in LONG_OPTIONS)
    # 0.88's letters keep the lenient scan; a new letter (-C) is validated by its row.
    new_letters = {"C"}
    assert all(option.field is None for option in OPTION_TABLE if option.name not in new_letters)
    assert all(
        option.field in fields and option.parse is not None for option in OPTION_TABLE if option.name in new_letters
    )
