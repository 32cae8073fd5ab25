"""Our tcpserver against the original (Debian's ucspi-tcp 0.88), scenario by scenario, over loopback.

Each scenario of tests/server/scenarios.py runs on both; their Outcomes must agree: the program's
environment (ports masked), the log (pids and ports masked), exit codes and the facts a scenario
records. Outcome.comparable() leaves out what the README's differences let differ: items 1 and 2 (no child
for a denied or dropped client; the order of the lines) and 8 (glibc's signals 32 and 33).
Items 3, 4 and 7 (host names, --help, a directory or empty cdb) are simply not run here.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

import scenarios
from fakes import fresh_loopback
from serverproc import (
    ORIGINAL_SERVER,
    ORIGINAL_TCPRULES,
    OUR_SERVER,
    Implementation,
    original_available,
    plain_environment,
)
from test_spawn_paths import ctypes_implementation
from test_tcpserver_environment import RAW_ENVIRONMENT, RULE_FORMS
from test_tcpserver_options import COMMAND_LINES, ORIGINAL_USAGE, USAGE

pytestmark = pytest.mark.skipif(
    not original_available(), reason="the original tcpserver is not installed (/usr/bin/tcpserver, Debian ucspi-tcp)"
)

Scenario = Callable[[Implementation, Path, str], scenarios.Outcome]


def compare(scenario: Scenario, tmp_path: Path, ip: str = "127.0.0.1", ours: Implementation = OUR_SERVER) -> None:
    """Run on ours, then on the original (same client address, fresh directories), and compare."""
    outcomes = {}
    for implementation in (ours, ORIGINAL_SERVER):
        directory = tmp_path / implementation.name
        directory.mkdir()
        outcomes[implementation.name] = scenario(implementation, directory, ip).comparable()
    assert outcomes[ours.name] == outcomes["original"]


def through_ctypes() -> Implementation:
    """Ours on the ctypes spawn path (UCSPI_NO_EXTENSION=1), for the spawn's scenarios."""
    implementation = ctypes_implementation()
    if implementation is None:
        pytest.skip("no C compiler for the wrapper that sets UCSPI_NO_EXTENSION=1")
    return implementation


# ---------------------------------------------------------------- environment


def served(options: list[str], **keywords: object) -> Scenario:
    return lambda implementation, directory, _ip: scenarios.served_environment(
        implementation,
        options,
        directory=directory,
        **keywords,  # type: ignore[arg-type]
    )


ENVIRONMENT_SCENARIOS = [
    pytest.param(served(["-HRl0"], environment=plain_environment({b"FOO": b"bar"})), id="plain"),
    *[
        pytest.param(
            served(["-HRl0"], rules=rule.values[0], environment=plain_environment({b"FOO": b"bar"})), id=rule.id
        )
        for rule in RULE_FORMS
    ],
    pytest.param(served(["-HRl", "local"], rules='127.0.0.1:allow,TCPLOCALHOST="rewritten"\n'), id="override-local"),
    pytest.param(
        served(["-HRl0"], rules='127.0.0.1:allow,PATH="/nonexistent"\n', program=["cat", "/proc/self/environ"]),
        id="rule-path",
    ),
    pytest.param(served(["-HRl0"], environment=[], bare=True, program=["cat", "/proc/self/environ"]), id="env-i"),
    pytest.param(served(["-HRl0"], environment=[b"LANG=C", *plain_environment()], bare=True), id="c-locale"),
    pytest.param(served(["-HRl0"], environment=RAW_ENVIRONMENT, bare=True), id="raw-environment"),
    pytest.param(
        served(
            ["-HRl0"],
            rules='127.0.0.1:allow,A="rule",="empty name",NOEQUALS="set"\n',
            environment=RAW_ENVIRONMENT,
            bare=True,
        ),
        id="raw-environment-rules",
    ),
    pytest.param(served(["-HRl", "loc%al:na me"]), id="log-sanitised"),
    pytest.param(served(["-HRl", "x" * 150]), id="log-truncated"),
    pytest.param(served(["-HRl", ""]), id="empty-local-name"),
]


@pytest.mark.parametrize("scenario", ENVIRONMENT_SCENARIOS)
def test_environment(scenario: Scenario, tmp_path: Path) -> None:
    compare(scenario, tmp_path)


@pytest.mark.parametrize("scenario", ENVIRONMENT_SCENARIOS)
def test_environment_through_ctypes(scenario: Scenario, tmp_path: Path) -> None:
    compare(scenario, tmp_path, ours=through_ctypes())


# ---------------------------------------------------------------- rules, log, processes

# Changing ids (-u, -g, -U) is root's: run by another user, both servers only say "permission denied".
_NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="-u/-g/-U change ids, which needs root")

OTHER_SCENARIOS = [
    pytest.param(lambda i, d, _: scenarios.deny_with_banner(i, d), id="deny-banner"),
    pytest.param(lambda i, d, _: scenarios.banner_then_program(i), id="banner"),
    pytest.param(lambda i, d, _: scenarios.rules_file_problem(i, d, "missing", False), id="rules-missing"),
    pytest.param(lambda i, d, _: scenarios.rules_file_problem(i, d, "missing", True), id="rules-missing-X"),
    pytest.param(lambda i, d, _: scenarios.rules_file_problem(i, d, "corrupt", False), id="rules-corrupt"),
    pytest.param(lambda i, d, _: scenarios.rules_file_problem(i, d, "corrupt", True), id="rules-corrupt-X"),
    pytest.param(lambda i, d, _: scenarios.rules_replaced_while_running(i, d, ORIGINAL_TCPRULES), id="rules-replaced"),
    pytest.param(lambda i, d, _: scenarios.program_missing(i, "/nonexistent/program"), id="program-missing"),
    pytest.param(lambda i, d, _: scenarios.program_missing(i, "nonexistentprogram"), id="program-not-on-path"),
    pytest.param(lambda i, d, _: scenarios.wait_statuses(i, ["0", "3", "100", "SEGV", "KILL"]), id="wait-statuses"),
    pytest.param(lambda i, d, _: scenarios.concurrency_limit(i, d, 2, 6), id="limit"),
    pytest.param(
        lambda i, d, _: scenarios.user_and_groups(i, ["-u65534", "-g65534"]), id="user-group", marks=_NEEDS_ROOT
    ),
    pytest.param(
        lambda i, d, _: scenarios.user_and_groups(i, ["-U"], plain_environment({b"UID": b"65534", b"GID": b"65534"})),
        id="user-group-U",
        marks=_NEEDS_ROOT,
    ),
    pytest.param(lambda i, d, _: scenarios.stdout_after_port(i), id="stdout-closed"),
    pytest.param(lambda i, d, _: scenarios.terminate_while_serving(i), id="sigterm"),
    pytest.param(lambda i, d, _: scenarios.other_signal(i, signal.SIGINT), id="sigint"),
    pytest.param(lambda i, d, _: scenarios.other_signal(i, signal.SIGHUP), id="sighup"),
    pytest.param(lambda i, d, _: scenarios.child_signals(i), id="child-signals"),
    pytest.param(
        lambda i, d, _: scenarios.child_signals(i, [signal.SIGHUP, signal.SIGINT]), id="child-signals-inherited"
    ),
    pytest.param(lambda i, d, _: scenarios.child_descriptors(i), id="child-descriptors"),
    pytest.param(lambda i, d, _: scenarios.bundled_options(i, d), id="bundled-options"),
    pytest.param(lambda i, d, _: scenarios.port_in_use(i), id="address-already-used"),
]


@pytest.mark.parametrize("scenario", OTHER_SCENARIOS)
def test_scenario(scenario: Scenario, tmp_path: Path) -> None:
    compare(scenario, tmp_path)


# What the spawn path decides: the program's start, its failures, its ids, signals and descriptors.
_SPAWN_SCENARIOS = {
    "program-missing",
    "program-not-on-path",
    "wait-statuses",
    "user-group",
    "user-group-U",
    "child-signals",
    "child-signals-inherited",
    "child-descriptors",
}


@pytest.mark.parametrize("scenario", [case for case in OTHER_SCENARIOS if case.id in _SPAWN_SCENARIOS])
def test_scenario_through_ctypes(scenario: Scenario, tmp_path: Path) -> None:
    compare(scenario, tmp_path, ours=through_ctypes())


@pytest.mark.parametrize(("arguments", "code", "stderr"), COMMAND_LINES)
def test_command_line(arguments: list[str], code: int, stderr: list[bytes], tmp_path: Path) -> None:
    def with_our_usage_line(implementation: Implementation, _directory: Path, _ip: str) -> scenarios.Outcome:
        outcome = scenarios.command_line(implementation, arguments)
        # The one difference here is the usage line, the IPv6 build's in ours (README, differences item 6).
        log = [USAGE if line == ORIGINAL_USAGE else line for line in outcome.log]
        return dataclasses.replace(outcome, log=log)

    compare(with_our_usage_line, tmp_path)


# ---------------------------------------------------------------- DNS and ident

JOE = b"1 , 2 : USERID : UNIX :  joe user:x \r\n"
STALE = {b"TCPREMOTEHOST": b"stale", b"TCPLOCALHOST": b"stale", b"TCPREMOTEINFO": b"stale"}


def looked_up(options: list[str], **keywords: object) -> Scenario:
    def scenario(implementation: Implementation, directory: Path, ip: str) -> scenarios.Outcome:
        rules = keywords.get("rules")
        extra = {"rules": rules.replace("CLIENTIP", ip)} if isinstance(rules, str) else {}
        return scenarios.lookup_environment(implementation, directory, ip, options, **{**keywords, **extra})  # type: ignore[arg-type]

    return scenario


LOOKUP_SCENARIOS = [
    pytest.param(looked_up(["-hR"]), id="ptr"),
    pytest.param(looked_up(["-HR"]), id="no-remote-ptr"),
    pytest.param(looked_up(["-hpR"]), id="paranoid-ok"),
    pytest.param(looked_up(["-hpR"], forward=["10.9.9.9"]), id="paranoid-mismatch"),
    pytest.param(looked_up(["-hR"], dns_mode="nxdomain", extra_environment=STALE), id="nxdomain-stale"),
    pytest.param(looked_up(["-hR"], rules='=client.example.com:allow,R="exact"\n=:allow,R="any"\n'), id="host-exact"),
    pytest.param(looked_up(["-hR"], rules='=.example.com:allow,R="suffix"\n=:allow,R="any"\n'), id="host-suffix"),
    pytest.param(looked_up(["-hR"], rules='=:allow,R="any"\n:allow,R="none"\n'), id="host-any"),
    pytest.param(looked_up(["-hR"], rules="=.com:deny\n"), id="host-deny"),
    pytest.param(looked_up(["-Hl0", "-r"], dns=False, ident_mode="reply", ident_reply=JOE), id="ident"),
    pytest.param(
        looked_up(["-Hl0", "-r"], dns=False, ident_mode="reply", ident_reply=b"1 , 2 : ERROR : NO-USER\r\n"),
        id="ident-error",
    ),
    pytest.param(looked_up(["-Hl0", "-rt1"], dns=False, ident_mode="silent"), id="ident-silent"),
    pytest.param(looked_up(["-Hl0", "-r"], dns=False), id="ident-refused"),
    pytest.param(
        looked_up(
            ["-Hl0", "-r"],
            dns=False,
            ident_mode="reply",
            ident_reply=b"1,2:USERID:UNIX:joe\r\n",
            rules='joe@CLIENTIP:allow,U="at ip"\nCLIENTIP:allow,U="ip"\n',
        ),
        id="user-at-ip",
    ),
    pytest.param(
        looked_up(
            ["-hr"],
            ident_mode="reply",
            ident_reply=b"1,2:USERID:UNIX:joe\r\n",
            rules='joe@=client.example.com:allow,U="at host"\n=:allow,U="host"\n',
        ),
        id="user-at-host",
    ),
    pytest.param(
        looked_up(
            ["-Hl0", "-r"],
            dns=False,
            ident_mode="reply",
            ident_reply=b"1,2:ERROR:NO-USER\r\n",
            rules='@CLIENTIP:allow,U="empty info"\n',
        ),
        id="empty-info-at-ip",
    ),
    pytest.param(
        looked_up(["-hpr", "-u65534", "-g65534"], ident_mode="reply", ident_reply=b"1,2:USERID:UNIX:joe\r\n"),
        id="lookups-after-setuid",
    ),
]


@pytest.mark.parametrize("scenario", LOOKUP_SCENARIOS)
def test_lookups(scenario: Scenario, tmp_path: Path) -> None:
    compare(scenario, tmp_path, fresh_loopback())
