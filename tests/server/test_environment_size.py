"""A program's environment costs time linear in its size (issue 9, row 7): a rule with 10,000
variables is that client's cost alone, and the build keeps pathexec's exact semantics."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from conftest import UNIT
from hypothesis import given
from hypothesis import strategies as st
from scenarios import CAT_ENVIRON
from serverproc import (
    ORIGINAL_SERVER,
    OUR_SERVER,
    Implementation,
    connect,
    environment_entries,
    mask_ports,
    original_available,
    pathexec_environment,
    plain_environment,
    read_to_eof,
    rules_cdb,
    start_server,
    tcp_changes,
)

from ucspi.server.peer import Peer
from ucspi.server.spawn import Environment, tcp_shape_and_values, tcp_variables

HEAVY_CLIENT = "127.0.0.2"
VARIABLE_COUNT = 10_000
INITIAL = plain_environment({b"FOO": b"bar", b"V00007": b"initial"})


def _rule_variables() -> list[tuple[bytes, bytes]]:
    """10,000 variables; every 100th repeats an earlier name, so removals move entries around."""
    variables = []
    for number in range(VARIABLE_COUNT):
        name = b"V%05d" % (number - 50 if number % 100 == 99 else number)
        variables.append((name, b"%d" % number))
    variables.append((b"FOO", b"from the rule"))
    return variables


def _heavy_and_unrelated(implementation: Implementation, cdb: Path) -> tuple[list[bytes], list[bytes], float]:
    """(the heavy client's environment, the unrelated client's, how long the unrelated one waited)."""
    with start_server(implementation.command, ["-HRl0", "-x", str(cdb)], CAT_ENVIRON, environment=INITIAL) as server:
        with connect(server.port, source=HEAVY_CLIENT, timeout=30) as heavy:
            time.sleep(0.05)  # the heavy client is being decided when the unrelated one comes
            started = time.monotonic()
            with connect(server.port, timeout=30) as unrelated:
                unrelated_environment = environment_entries(read_to_eof(unrelated, timeout=30))
            unrelated_wait = time.monotonic() - started
            heavy_environment = environment_entries(read_to_eof(heavy, timeout=30))
    return mask_ports(heavy_environment), mask_ports(unrelated_environment), unrelated_wait


def test_a_rule_with_10000_variables_costs_only_its_own_client(tmp_path: Path) -> None:
    variables = _rule_variables()
    rule = b",".join(name + b'="' + value + b'"' for name, value in variables)
    cdb = rules_cdb(tmp_path, b"%s:allow,%s\n:allow\n" % (HEAVY_CLIENT.encode(), rule))
    heavy, unrelated, unrelated_wait = _heavy_and_unrelated(OUR_SERVER, cdb)
    assert unrelated == pathexec_environment(
        INITIAL, tcp_changes("127.0.0.1", "PORT", "127.0.0.1", "PORT", local_host=b"0")
    )
    # Generous: the original serves it in milliseconds; the quadratic build took about 7 s.
    assert unrelated_wait < 1.0
    if original_available():
        expected, _unrelated, original_wait = _heavy_and_unrelated(ORIGINAL_SERVER, cdb)
        assert original_wait < 1.0
    else:
        # The model is quadratic itself: seconds here, so only where the original is missing.
        changes = tcp_changes("127.0.0.1", "PORT", HEAVY_CLIENT, "PORT", local_host=b"0") + variables
        expected = pathexec_environment(INITIAL, changes)
    assert b"FOO=from the rule" in expected and len(expected) > VARIABLE_COUNT * 0.99
    assert heavy == expected


def test_sigterm_while_a_10000_variable_client_is_decided_ends_the_server_at_once(tmp_path: Path) -> None:
    variables = _rule_variables()
    rule = b",".join(name + b'="' + value + b'"' for name, value in variables)
    cdb = rules_cdb(tmp_path, b"%s:allow,%s\n:allow\n" % (HEAVY_CLIENT.encode(), rule))
    with start_server(OUR_SERVER.command, ["-HRl0", "-x", str(cdb)], CAT_ENVIRON, environment=INITIAL) as server:
        with connect(server.port, source=HEAVY_CLIENT, timeout=30):
            time.sleep(0.05)
            sent = time.monotonic()
            server.signal(signal.SIGTERM)
            exit_code = server.wait(timeout=30)
            took = time.monotonic() - sent
    assert exit_code == 0
    assert took < 1.0  # the quadratic build held TERM back for seconds


# Few names, so that duplicates and removals of present names are common; the empty name too.
_NAMES = st.sampled_from([b"", b"A", b"B", b"AB", b"PATH", b"TCPREMOTEIP", b"X", b"X=Y"])
_VALUES = st.sampled_from([b"", b"1", b"two", b"=", b"a=b", b"Y=1"])  # X + Y=1 is X=Y=1
_INITIAL_ENTRIES = st.lists(
    st.one_of(
        st.builds(lambda name, value: name + b"=" + value, _NAMES, _VALUES),
        st.sampled_from([b"A", b"NOEQUALS", b"", b"=", b"=x", b"AB"]),  # entries without `=`, the empty name
    ),
    max_size=30,
)
_CHANGES = st.lists(st.tuples(_NAMES, st.one_of(st.none(), _VALUES)), max_size=30)


@UNIT
@given(initial=_INITIAL_ENTRIES, changes=_CHANGES, other_values=st.lists(_VALUES, min_size=30, max_size=30))
def test_build_is_pathexec(
    initial: list[bytes], changes: list[tuple[bytes, bytes | None]], other_values: list[bytes]
) -> None:
    environment = Environment(initial)
    assert environment.build(changes) == pathexec_environment(initial, changes)
    # The same shape again, other values: the cached plan places the new values.
    same_shape = [
        (name, None if value is None else other) for (name, value), other in zip(changes, other_values, strict=False)
    ]
    assert environment.build(same_shape) == pathexec_environment(initial, same_shape)
    assert environment.initial == initial  # the server's own copy is never changed


def test_build_of_the_original_s_examples() -> None:
    """Hand-checked cases: the first entry of a name goes, the last entry takes its place."""
    initial = [b"A=1", b"B=2", b"A=3", b"C", b"=e", b"D=4"]
    environment = Environment(initial)
    assert environment.build([(b"A", b"new")]) == [b"D=4", b"B=2", b"A=3", b"C", b"=e", b"A=new"]
    assert environment.build([(b"A", None), (b"A", None)]) == [b"D=4", b"B=2", b"=e", b"C"]
    assert environment.build([(b"", b"x"), (b"C", None)]) == [b"A=1", b"B=2", b"A=3", b"C", b"D=4", b"=x"]
    assert environment.build([(b"D", b"5"), (b"D", b"6")]) == [b"A=1", b"B=2", b"A=3", b"C", b"=e", b"D=6"]


@UNIT
@given(
    ipv6=st.booleans(),
    scoped=st.booleans(),
    local_host=st.none() | st.just(b"local.example"),
    remote_host=st.none() | st.just(b"remote.example"),
    remote_info=st.none() | st.just(b"joe"),
)
def test_the_prebuilt_tcp_shapes_give_what_tcp_variables_gives(
    ipv6: bool, scoped: bool, local_host: bytes | None, remote_host: bytes | None, remote_info: bytes | None
) -> None:
    """tcpserver's path finds a client's shape among those made at import (tcp_shape_and_values):
    for every kind of peer, the environment is the one its tcp_variables make."""
    peer = Peer(
        b"::1" if ipv6 else b"127.0.0.1", 25, local_host, b"::2" if ipv6 else b"127.0.0.2", 4321,
        remote_host, remote_info, ipv6, b"127.0.0.2", b"lo" if ipv6 and scoped else None,
    )  # fmt: skip
    initial = [b"PROTO=old", b"TCPREMOTEHOST=stale", b"TCP6REMOTEINFO=stale", b"PATH=/bin"]
    environment = Environment(initial)
    expected = pathexec_environment(initial, tcp_variables(peer))
    assert environment.build_from(*tcp_shape_and_values(peer)) == expected
    assert environment.build_from(*tcp_shape_and_values(peer)) == expected  # the plan, kept
