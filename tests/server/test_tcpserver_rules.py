"""Rules end to end: deny, a missing or corrupt cdb, a cdb replaced while serving (docs/behaviour.md §5, 2.5, 2.6)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scenarios import deny_with_banner, rules_file_problem, rules_replaced_while_running
from serverproc import ORIGINAL_TCPRULES, OUR_SERVER, OUR_TCPRULES, original_available


def test_deny_sends_the_banner_then_eof_and_runs_nothing(tmp_path: Path) -> None:
    outcome = deny_with_banner(OUR_SERVER, tmp_path)
    assert outcome.replies == [b"banner\n"]
    assert outcome.facts["program ran"] is False
    # No child, so no pid and end lines (README, differences item 1); the slot is taken and given back.
    assert outcome.log == [
        b"tcpserver: status: 0/40",
        b"tcpserver: status: 1/40",
        b"tcpserver: deny PID 0:127.0.0.1:PORT :127.0.0.1::PORT",
        b"tcpserver: status: 0/40",
    ]


DROPPED = [b"", b""]


@pytest.mark.parametrize(
    ("problem", "allow_missing", "warning"),
    [
        ("missing", False, b"unable to read DIR/rules.cdb: file does not exist"),
        ("corrupt", False, b"unable to read DIR/rules.cdb: protocol error"),
        ("corrupt", True, b"unable to read DIR/rules.cdb: protocol error"),
    ],
)
def test_unreadable_rules_drop_the_client(tmp_path: Path, problem: str, allow_missing: bool, warning: bytes) -> None:
    outcome = rules_file_problem(OUR_SERVER, tmp_path, problem, allow_missing)
    assert outcome.replies == DROPPED
    drop = b"tcpserver: warning: dropping connection, " + warning
    assert outcome.log == [
        b"tcpserver: status: 0/40",
        *[b"tcpserver: status: 1/40", drop, b"tcpserver: status: 0/40"] * 2,
    ]


def test_missing_rules_with_capital_x_mean_no_rules(tmp_path: Path) -> None:
    outcome = rules_file_problem(OUR_SERVER, tmp_path, "missing", True)
    assert all(b"PROTO=TCP" in environment for environment in outcome.environments)
    assert len(outcome.environments) == 2
    assert not any(b"warning" in line for line in outcome.log)


@pytest.mark.parametrize("tcprules", ["ours", "original"])
def test_replaced_rules_apply_to_the_next_client(tmp_path: Path, tcprules: str) -> None:
    if tcprules == "original" and not original_available():
        pytest.skip("the original tcprules is not installed")
    command = OUR_TCPRULES if tcprules == "ours" else ORIGINAL_TCPRULES
    outcome = rules_replaced_while_running(OUR_SERVER, tmp_path, command)
    first, second, third = outcome.environments
    assert first[-1] == b"GENERATION=1"
    assert second[-1] == b"GENERATION=2"
    assert third == []
    assert outcome.log[-2] == b"tcpserver: deny PID 0:127.0.0.1:PORT :127.0.0.1::PORT"
