"""The server as a process: -c, -u/-g/-U, -1 and fds 0/1, signals to the server and in the program,
the program's descriptors (docs/behaviour.md §6.2, 6.4, 6.5, 6.6)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from scenarios import (
    child_descriptors,
    child_signals,
    concurrency_limit,
    other_signal,
    stdout_after_port,
    terminate_while_serving,
    user_and_groups,
)
from serverproc import OUR_SERVER, plain_environment

NOBODY = 65534  # nobody / nogroup on Debian

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing ids needs root")


@pytest.mark.parametrize(("limit", "clients"), [(2, 6), (1, 3)])
def test_limit_is_never_exceeded_and_every_client_is_served(tmp_path: Path, limit: int, clients: int) -> None:
    outcome = concurrency_limit(OUR_SERVER, tmp_path, limit, clients)
    assert outcome.replies == [b"served\n"] * clients
    assert outcome.facts["programs"] == clients
    assert outcome.facts["most running"] == limit
    assert outcome.facts["most in log"] == limit


@needs_root
def test_user_and_group(tmp_path: Path) -> None:
    outcome = user_and_groups(OUR_SERVER, [f"-u{NOBODY}", "-g", str(NOBODY)])
    assert outcome.replies == [b"%d\n%d\n%d\n" % (NOBODY, NOBODY, NOBODY)]
    assert b"tcpserver: end PID status 0" in outcome.log


@needs_root
def test_ids_from_the_environment_with_capital_u() -> None:
    environment = plain_environment({b"UID": b"%d" % NOBODY, b"GID": b"%d" % NOBODY})
    outcome = user_and_groups(OUR_SERVER, ["-U"], environment)
    assert outcome.replies == [b"%d\n%d\n%d\n" % (NOBODY, NOBODY, NOBODY)]


def test_stdout_ends_right_after_the_port_line() -> None:
    """`port=$(tcpserver -1 ... &)` returns: fds 0 and 1 are closed after the port is printed."""
    outcome = stdout_after_port(OUR_SERVER)
    assert outcome.facts == {"stdout after the port": b"", "alive": True}
    assert outcome.replies == [b"hi\n"]


def test_sigterm_exits_0_at_once_and_the_program_carries_on() -> None:
    outcome = terminate_while_serving(OUR_SERVER)
    assert outcome.exit_code == 0
    assert outcome.facts == {"quick": True, "refused after": True}
    assert outcome.replies == [b"started\n", b"finished after\n"]
    # Nothing after SIGTERM: the program is neither reaped nor logged.
    assert outcome.log[-1] == b"tcpserver: ok PID 0:127.0.0.1:PORT :127.0.0.1::PORT"


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_end_the_server_quietly(number: int) -> None:
    outcome = other_signal(OUR_SERVER, number)
    assert outcome.exit_code == -number
    assert outcome.log == []  # no traceback, nothing at all


def test_program_starts_with_default_signals() -> None:
    assert child_signals(OUR_SERVER).facts == {"SigBlk": 0, "SigIgn": 0}


def test_signals_ignored_by_the_server_s_parent_stay_ignored() -> None:
    """The original leaves alone what it inherited as ignored; so must ours (SIGHUP, SIGINT here)."""
    outcome = child_signals(OUR_SERVER, [signal.SIGHUP, signal.SIGINT])
    assert outcome.facts == {"SigBlk": 0, "SigIgn": (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGINT - 1))}


def test_program_sees_the_connection_stderr_and_inherited_descriptors() -> None:
    outcome = child_descriptors(OUR_SERVER)
    assert outcome.replies == [b"ping\n"]
    extra = outcome.facts["extra"]
    assert outcome.facts["descriptors"] == {0: "connection", 1: "connection", 2: "pipe:", extra: "/dev/null"}


def test_a_child_the_server_had_before_it_was_tcpserver_is_reaped_and_ends_stay_right() -> None:
    """`sh -c 'sleep 1 & exec tcpserver ...'`: the sleep is the server's child too, known to no
    spawn. Its end, amid the programs', is reaped (no zombie is left) and holds up no program's."""
    import time

    from serverproc import start_server, talk
    from serverstate import children, in_threads, wait_idle

    limit = 20
    program = ["/bin/sh", "-c", "sleep 0.1; echo ok"]
    wrapper = ["/bin/sh", "-c", 'sleep 1 & exec "$0" "$@"']
    with start_server(OUR_SERVER.command, ["-v", "-HRl0", "-c", str(limit)], program, wrapper=wrapper) as server:
        assert any(state != "Z" for _pid, state in children(server.pid))  # the sleep, before its end
        served = 0
        deadline = time.monotonic() + 2.5  # clients before, across and after the sleep's end
        while time.monotonic() < deadline:
            assert in_threads(10, lambda _index: talk(server.port, timeout=10)) == [b"ok\n"] * 10
            served += 10
        wait_idle(server, limit, timeout=10)
        assert children(server.pid) == []
        ends = [line for line in server.log() if line.startswith(b"tcpserver: end ")]
        assert len(ends) == served
        assert all(line.endswith(b" status 0") for line in ends)
