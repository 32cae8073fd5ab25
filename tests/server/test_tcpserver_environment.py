"""The program's environment, end to end: tcpserver's variables, rule variables, and what it was
started with passed through byte for byte (docs/behaviour.md §6.7, 5; raw entries read from /proc/self/environ)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scenarios import CAT_ENVIRON, served_environment
from serverproc import (
    OUR_SERVER,
    connect,
    environment_entries,
    pathexec_environment,
    plain_environment,
    read_to_eof,
    start_server,
    tcp_changes,
)

LOOPBACK = "127.0.0.1"


def tcp(**names: bytes | None) -> list[tuple[bytes, bytes | None]]:
    """tcpserver's own changes for a 127.0.0.1 client with -H -R (ports masked), -l0 by default."""
    names.setdefault("local_host", b"0")
    return tcp_changes(LOOPBACK, "PORT", LOOPBACK, "PORT", **names)  # type: ignore[arg-type]


def test_plain_environment_and_log(tmp_path: Path) -> None:
    initial = plain_environment({b"FOO": b"bar"})
    outcome = served_environment(OUR_SERVER, ["-HRl0"], directory=tmp_path, environment=initial)
    assert outcome.environments == [pathexec_environment(initial, tcp())]
    assert outcome.log == [
        b"tcpserver: status: 0/40",
        b"tcpserver: status: 1/40",
        b"tcpserver: pid PID from 127.0.0.1",
        b"tcpserver: ok PID 0:127.0.0.1:PORT :127.0.0.1::PORT",
        b"tcpserver: end PID status 0",
        b"tcpserver: status: 0/40",
    ]


def test_ports_are_the_connection_s(tmp_path: Path) -> None:
    with start_server(OUR_SERVER.command, ["-HRl0"], CAT_ENVIRON) as server:
        with connect(server.port) as client:
            client_port = client.getsockname()[1]
            entries = environment_entries(read_to_eof(client))
    assert f"TCPLOCALPORT={server.port}".encode() in entries
    assert f"TCPREMOTEPORT={client_port}".encode() in entries


RULE_FORMS = [
    pytest.param('127.0.0.1:allow,A="1",B="two"\n', [(b"A", b"1"), (b"B", b"two")], id="ip-with-variables"),
    pytest.param("127.0.0.1:allow\n", [], id="ip-no-variables"),
    pytest.param('127.0.:allow,P="prefix"\n:allow,E="default"\n', [(b"P", b"prefix")], id="prefix"),
    pytest.param('10.:allow,NO="x"\n:allow,E="default"\n', [(b"E", b"default")], id="empty-key"),
    pytest.param('=:allow,H="host"\n10.:deny\n', [], id="no-match"),
    pytest.param('127.0.0.1:allow,="x"\n', [(b"", b"x")], id="empty-name"),
    pytest.param('127.0.0.1:allow,A,B="comma"\n', [(b"A,B", b"comma")], id="comma-in-name"),
    pytest.param('127.0.0.1:allow,FOO="rule"\n', [(b"FOO", b"rule")], id="overrides-inherited"),
    pytest.param('127.0.0.1:allow,X="1",X="2"\n', [(b"X", b"1"), (b"X", b"2")], id="same-name-twice"),
]


@pytest.mark.parametrize(("rules", "variables"), RULE_FORMS)
def test_rule_variables(tmp_path: Path, rules: str, variables: list[tuple[bytes, bytes]]) -> None:
    initial = plain_environment({b"FOO": b"bar"})
    outcome = served_environment(OUR_SERVER, ["-HRl0"], rules=rules, directory=tmp_path, environment=initial)
    assert outcome.environments == [pathexec_environment(initial, tcp() + variables)]


def test_empty_name_reaches_the_program_as_equals_value(tmp_path: Path) -> None:
    outcome = served_environment(OUR_SERVER, ["-HRl0"], rules='127.0.0.1:allow,="x"\n', directory=tmp_path)
    assert outcome.environments[0][-1] == b"=x"


def test_rule_overrides_tcplocalhost_but_not_the_log(tmp_path: Path) -> None:
    rules = '127.0.0.1:allow,TCPLOCALHOST="rewritten"\n'
    outcome = served_environment(OUR_SERVER, ["-HRl", "local"], rules=rules, directory=tmp_path)
    initial = plain_environment()
    expected = pathexec_environment(initial, [*tcp(local_host=b"local"), (b"TCPLOCALHOST", b"rewritten")])
    assert outcome.environments == [expected]
    assert b"tcpserver: ok PID local:127.0.0.1:PORT :127.0.0.1::PORT" in outcome.log


def test_program_is_found_on_the_server_s_path_not_the_rule_s(tmp_path: Path) -> None:
    rules = '127.0.0.1:allow,PATH="/nonexistent"\n'
    outcome = served_environment(
        OUR_SERVER, ["-HRl0"], rules=rules, directory=tmp_path, program=["cat", "/proc/self/environ"]
    )
    assert outcome.environments == [pathexec_environment(plain_environment(), [*tcp(), (b"PATH", b"/nonexistent")])]


def test_empty_environment(tmp_path: Path) -> None:
    """env -i: nothing but tcpserver's variables (the program is found on the default /bin:/usr/bin)."""
    outcome = served_environment(
        OUR_SERVER, ["-HRl0"], directory=tmp_path, environment=[], bare=True, program=["cat", "/proc/self/environ"]
    )
    assert outcome.environments == [pathexec_environment([], tcp())]


def test_c_locale_adds_nothing(tmp_path: Path) -> None:
    """LANG=C without LC_ALL: Python coerces the locale and sets LC_CTYPE; the program must not see it."""
    initial = [b"LANG=C", *plain_environment()]
    outcome = served_environment(OUR_SERVER, ["-HRl0"], directory=tmp_path, environment=initial, bare=True)
    assert outcome.environments == [pathexec_environment(initial, tcp())]
    assert not any(entry.startswith(b"LC_") for entry in outcome.environments[0])


RAW_ENVIRONMENT = [
    b"A=first",
    b"PATH=/usr/bin:/bin",
    b"A=second",
    b"NOEQUALS",
    b"=leading",
    b"TCPREMOTEHOST=stale",
    b"TCPREMOTEINFO=stale",
    b"TCPLOCALHOST=stale",
    b"PROTO=stale",
    b"A=third",
    b"EMPTY=",
    b"TCPREMOTEIP",
]


def test_duplicates_and_entries_without_equals_pass_through(tmp_path: Path) -> None:
    outcome = served_environment(OUR_SERVER, ["-HRl0"], directory=tmp_path, environment=RAW_ENVIRONMENT, bare=True)
    expected = pathexec_environment(RAW_ENVIRONMENT, tcp())
    assert outcome.environments == [expected]
    # The model's own sanity: stale values gone, duplicates and odd entries kept.
    assert b"TCPREMOTEHOST=stale" not in expected and b"TCPREMOTEINFO=stale" not in expected
    assert expected.count(b"NOEQUALS") == 1 and b"TCPREMOTEIP" in expected and b"=leading" in expected


def test_rule_variables_with_a_raw_environment(tmp_path: Path) -> None:
    rules = '127.0.0.1:allow,A="rule",="empty name",NOEQUALS="set"\n'
    outcome = served_environment(
        OUR_SERVER, ["-HRl0"], rules=rules, directory=tmp_path, environment=RAW_ENVIRONMENT, bare=True
    )
    variables = [(b"A", b"rule"), (b"", b"empty name"), (b"NOEQUALS", b"set")]
    assert outcome.environments == [pathexec_environment(RAW_ENVIRONMENT, tcp() + variables)]
