"""TCPLOCALHOST, TCPREMOTEHOST and TCPREMOTEINFO end to end, with a fake DNS ($DNSCACHEIP) and a
fake identd, each on the test's own 127.0.0.N; =host and user@ rules (docs/behaviour.md §6.6-6.9, 5).

The server listens on 127.0.0.1 and the client connects from 127.0.0.N, so the server's PTR
questions go to the fake DNS on N and its ident query to N:113; N reads CLIENTIP in outcomes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakes import fresh_loopback
from scenarios import lookup_environment
from serverproc import OUR_SERVER, pathexec_environment, tcp_changes

LOCAL = b"local.example.com"  # the fake's PTR answers are mixed case: names come out lower-cased
CLIENT = b"client.example.com"
JOE = b"1 , 2 : USERID : UNIX :  joe user:x \r\n"


@pytest.fixture
def ip() -> str:
    return fresh_loopback()


def expected(
    *,
    local_host: bytes | None = LOCAL,
    remote_host: bytes | None = None,
    remote_info: bytes | None = None,
    variables: list[tuple[bytes, bytes]] | None = None,
    extra: list[bytes] | None = None,
) -> list[bytes]:
    initial = [b"PATH=" + os.environb.get(b"PATH", b""), b"DNSCACHEIP=CLIENTIP", *(extra or [])]
    changes = tcp_changes(
        "127.0.0.1", "PORT", "CLIENTIP", "PORT", local_host=local_host, remote_host=remote_host, remote_info=remote_info
    )
    return pathexec_environment(initial, changes + (variables or []))


def ok_line(local: bytes = LOCAL, remote: bytes = b"", info: bytes = b"") -> bytes:
    return b"tcpserver: ok PID %s:127.0.0.1:PORT %s:CLIENTIP:%s:PORT" % (local, remote, info)


def test_remote_and_local_names_by_ptr(tmp_path: Path, ip: str) -> None:
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-hR"])
    assert outcome.environments == [expected(remote_host=CLIENT)]
    assert ok_line(remote=CLIENT) in outcome.log
    assert outcome.facts["questions"] == [
        ("1.0.0.127.in-addr.arpa.", "PTR"),
        (".".join(reversed(ip.split("."))) + ".in-addr.arpa.", "PTR"),
    ]


def test_no_remote_lookup_with_capital_h(tmp_path: Path, ip: str) -> None:
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-HR"])
    assert outcome.environments == [expected()]
    assert outcome.facts["questions"] == [("1.0.0.127.in-addr.arpa.", "PTR")]


def test_paranoid_keeps_a_name_that_resolves_back(tmp_path: Path, ip: str) -> None:
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-hpR"])
    assert outcome.environments == [expected(remote_host=CLIENT)]
    assert ("client.example.com.", "A") in outcome.facts["questions"]  # type: ignore[operator]


def test_paranoid_drops_a_name_that_does_not(tmp_path: Path, ip: str) -> None:
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-hpR"], forward=["10.9.9.9"])
    assert outcome.environments == [expected()]
    assert ok_line() in outcome.log


def test_stale_variables_are_removed_when_lookups_fail(tmp_path: Path, ip: str) -> None:
    stale = {b"TCPREMOTEHOST": b"stale", b"TCPLOCALHOST": b"stale", b"TCPREMOTEINFO": b"stale"}
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-hR"], dns_mode="nxdomain", extra_environment=stale)
    extra = [name + b"=" + value for name, value in stale.items()]
    assert outcome.environments == [expected(local_host=None, extra=extra)]
    assert not any(b"stale" in entry for entry in outcome.environments[0])
    assert ok_line(local=b"") in outcome.log


@pytest.mark.parametrize(
    ("rules", "variables"),
    [
        pytest.param('=client.example.com:allow,R="exact"\n=:allow,R="any"\n', [(b"R", b"exact")], id="exact"),
        pytest.param('=.example.com:allow,R="suffix"\n=:allow,R="any"\n', [(b"R", b"suffix")], id="suffix"),
        pytest.param('=:allow,R="any"\n:allow,R="none"\n', [(b"R", b"any")], id="any-host"),
        pytest.param('=Client.Example.COM:allow,R="case"\n', [], id="case-sensitive"),
    ],
)
def test_host_rules(tmp_path: Path, ip: str, rules: str, variables: list[tuple[bytes, bytes]]) -> None:
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-hR"], rules=rules)
    assert outcome.environments == [expected(remote_host=CLIENT, variables=variables)]


def test_host_rule_deny(tmp_path: Path, ip: str) -> None:
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-hR"], rules="=.com:deny\n")
    assert outcome.replies == [b""]
    assert b"tcpserver: deny PID local.example.com:127.0.0.1:PORT client.example.com:CLIENTIP::PORT" in outcome.log


def test_ident_answer(tmp_path: Path, ip: str) -> None:
    outcome = lookup_environment(
        OUR_SERVER, tmp_path, ip, ["-Hl0", "-r"], dns=False, ident_mode="reply", ident_reply=JOE
    )
    assert outcome.environments == [expected(local_host=b"0", remote_info=b"joeuser:x")]
    assert ok_line(local=b"0", info=b"joeuser?x") in outcome.log
    assert outcome.facts["ident requests"] == [True]


def test_ident_error_reply_sets_an_empty_value(tmp_path: Path, ip: str) -> None:
    reply = b"1 , 2 : ERROR : NO-USER\r\n"
    outcome = lookup_environment(
        OUR_SERVER, tmp_path, ip, ["-Hl0", "-r"], dns=False, ident_mode="reply", ident_reply=reply
    )
    assert outcome.environments == [expected(local_host=b"0", remote_info=b"")]


def test_ident_silence_past_the_time_limit_unsets(tmp_path: Path, ip: str) -> None:
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-Hl0", "-rt1"], dns=False, ident_mode="silent")
    assert outcome.environments == [expected(local_host=b"0")]
    assert outcome.facts["took a second"] is True


def test_ident_refused_unsets(tmp_path: Path, ip: str) -> None:
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-Hl0", "-r"], dns=False)
    assert outcome.environments == [expected(local_host=b"0")]


def test_user_at_ip_rule(tmp_path: Path, ip: str) -> None:
    rules = f'joe@{ip}:allow,U="at ip"\n{ip}:allow,U="ip"\n'
    reply = b"1,2:USERID:UNIX:joe\r\n"
    outcome = lookup_environment(
        OUR_SERVER, tmp_path, ip, ["-Hl0", "-r"], dns=False, ident_mode="reply", ident_reply=reply, rules=rules
    )
    assert outcome.environments == [expected(local_host=b"0", remote_info=b"joe", variables=[(b"U", b"at ip")])]


def test_user_at_host_rule(tmp_path: Path, ip: str) -> None:
    rules = 'joe@=client.example.com:allow,U="at host"\n=:allow,U="host"\n'
    reply = b"1,2:USERID:UNIX:joe\r\n"
    outcome = lookup_environment(OUR_SERVER, tmp_path, ip, ["-hr"], ident_mode="reply", ident_reply=reply, rules=rules)
    variables = [(b"U", b"at host")]
    assert outcome.environments == [expected(remote_host=CLIENT, remote_info=b"joe", variables=variables)]


def test_empty_info_matches_at_ip(tmp_path: Path, ip: str) -> None:
    rules = f'@{ip}:allow,U="empty info"\n'
    reply = b"1,2:ERROR:NO-USER\r\n"
    outcome = lookup_environment(
        OUR_SERVER, tmp_path, ip, ["-Hl0", "-r"], dns=False, ident_mode="reply", ident_reply=reply, rules=rules
    )
    assert outcome.environments == [expected(local_host=b"0", remote_info=b"", variables=[(b"U", b"empty info")])]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing ids needs root")
def test_lookups_after_dropping_privileges(tmp_path: Path, ip: str) -> None:
    """Everything the lookups need is loaded before -u/-g: the package may be unreadable after."""
    reply = b"1,2:USERID:UNIX:joe\r\n"
    outcome = lookup_environment(
        OUR_SERVER, tmp_path, ip, ["-hpr", "-u65534", "-g65534"], ident_mode="reply", ident_reply=reply
    )
    assert outcome.environments == [expected(remote_host=CLIENT, remote_info=b"joe")]
