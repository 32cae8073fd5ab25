"""Every -v line: status, pid, ok, deny, end with raw wait statuses; the banner (docs/behaviour.md §6.10, 6.6)."""

from __future__ import annotations

from scenarios import banner_then_program, program_missing, wait_statuses
from serverproc import FALLBACK_FORCED, OUR_SERVER

SERVED = [
    b"tcpserver: status: 1/40",
    b"tcpserver: pid PID from 127.0.0.1",
    b"tcpserver: ok PID 0:127.0.0.1:PORT :127.0.0.1::PORT",
]


def test_end_lines_carry_the_raw_wait_status() -> None:
    hows = {"0": 0, "3": 768, "100": 25600, "SEGV": 11, "KILL": 9}
    outcome = wait_statuses(OUR_SERVER, list(hows))
    expected = [b"tcpserver: status: 0/40"]
    for status in hows.values():
        expected += [*SERVED, b"tcpserver: end PID status %d" % status, b"tcpserver: status: 0/40"]
    assert outcome.log == expected


def test_banner_comes_first_and_verbatim() -> None:
    outcome = banner_then_program(OUR_SERVER)
    assert outcome.replies == [b"hello\\n\nprogram\n"]
    assert outcome.log == [
        b"tcpserver: status: 0/40",
        *SERVED,
        b"tcpserver: end PID status 0",
        b"tcpserver: status: 0/40",
    ]


def test_program_missing_drops_each_client_and_the_server_carries_on() -> None:
    outcome = program_missing(OUR_SERVER, "/nonexistent/program")
    assert outcome.replies == [b"", b""]
    assert outcome.facts["alive after"] is True
    drop = b"tcpserver: warning: dropping connection, unable to run /nonexistent/program: file does not exist"
    if FALLBACK_FORCED:
        # posix_spawn reaps the failed child itself: its pid and end lines go (differences item 1).
        each = [b"tcpserver: status: 1/40", SERVED[2], drop, b"tcpserver: status: 0/40"]
    else:
        # The original's lines: its child logs pid and ok, fails to exec, says so and exits 111.
        each = [*SERVED, drop, b"tcpserver: end PID status 28416", b"tcpserver: status: 0/40"]
    assert outcome.log == [b"tcpserver: status: 0/40", *each * 2]


def test_program_not_on_path() -> None:
    outcome = program_missing(OUR_SERVER, "nonexistentprogram")
    assert (
        b"tcpserver: warning: dropping connection, unable to run nonexistentprogram: file does not exist" in outcome.log
    )
    assert outcome.facts["alive after"] is True
