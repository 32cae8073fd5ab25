"""The command line: usage, getopt errors, bundled and attached forms, --help, host and port
errors (spec 6.1, 6.3, 6.4; differences item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scenarios import bundled_options, command_line, port_in_use
from serverproc import OUR_SERVER

# Ours is the usage line of Debian's IPv6 build (differences item 6); the 0.88 one differs.
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
    """differences item 4."""
    outcome = command_line(OUR_SERVER, ["--help"])
    assert outcome.exit_code == 0
    assert outcome.log == []
    assert outcome.replies[0].startswith(b"Usage: tcpserver")


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
