"""IPv6 and CIDR rules (README, differences item 5, docs/behaviour.md §8.1, 8.2): the keys tcprules stores, the lengths
record, the lookup order and tcprulescheck's report. In-process, plus our commands end to end."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import cdbx
import pytest
from conftest import command_environment, our_command, run_command

from ucspi.rules.cidr import CIDR_LENGTHS_KEY, CidrLengths, CidrLengthsSeen, decode_cidr_lengths
from ucspi.rules.compile import compile_rules
from ucspi.rules.database import RulesFile
from ucspi.rules.lookup import Decision, candidate_keys, describe, find_rule, lookup_address
from ucspi.rules.syntax import RuleSyntaxError, add_records, rule_records


def records(text: bytes) -> list[tuple[bytes, bytes]]:
    return list(rule_records([text]))


def keys(text: bytes) -> list[bytes]:
    return [key for key, _ in records(text)]


def compiled(tmp_path: Path, text: bytes) -> Path:
    source = tmp_path / "rules.txt"
    source.write_bytes(text)
    fd = os.open(source, os.O_RDONLY)
    try:
        compile_rules(fd, os.fsencode(tmp_path / "rules.cdb"), os.fsencode(tmp_path / "rules.tmp"))
    finally:
        os.close(fd)
    return tmp_path / "rules.cdb"


# ---- the separator (README, differences item 5) ----


@pytest.mark.parametrize(
    ("line", "key"),
    [
        # docs/behaviour.md §8.1's examples: the first ":" followed by allow/deny and then "," or the end.
        (b"::1:allow", b"::1"),
        (b"2001:db8::1:deny", b"2001:db8::1"),
        (b"2001:db8::allow", b"2001:db8:"),  # a prefix
        (b"2001:allow", b"2001"),  # the first colon: 0.88's key, not a prefix
        (b"2001::allow", b"2001:"),
        (b'::1:allow,X="a:deny"', b"::1"),
        (b"1.2.3.4:allow,X=:deny:", b"1.2.3.4"),  # the first colon qualifies: 0.88's reading
        (b"::1:deny \t", b"::1"),
    ],
)
def test_separator(line: bytes, key: bytes) -> None:
    assert keys(line + b"\n") == [key]


@pytest.mark.parametrize(
    "line",
    [
        # No qualifying colon: 0.88's first colon, and its parse error.
        b"::1:allowx", b"::1:allow\r", b"2001:db8::1:Allow", b"1.2.3.4:bad", b"::1:allow,",
        # A qualifying colon, but what is before it is no IPv6 rule.
        b"1.2.3.4:bogus:allow", b"abc:def:allow", b"2001:db8:1:allow", b"=host:x:allow", b"joe@=h:1:deny",
        b"a:b@1.2.3.4:allow", b" ::1:allow", b"::1 :allow", b"fe80::1%eth0:allow", b"1:2:3:4:5:6:7:8:9:allow",
        b"::ffff:1.2.:allow", b"::1-3:allow", b"x::allow", b"::allow",
        b"\x00:cidr-lengths:allow",  # the lengths record's key: no line compiles to it
    ],
)
def test_not_an_ipv6_rule_is_the_original_parse_error(line: bytes) -> None:
    with pytest.raises(RuleSyntaxError) as raised:
        records(b"1.2.3.4:allow\n" + line + b"\n5.6.7.8:allow\n")
    assert raised.value.line == line.rstrip(b" \t")


def test_lines_without_a_colon_are_still_skipped() -> None:
    assert records(b"2001/db8\n \n10.0.0.0/8\n::1:allow\n") == [(b"::1", b"")]


# ---- exact addresses and prefixes ----


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (b"2001:DB8::1", b"2001:db8::1"),
        (b"2001:0db8:0000:0000:0000:0000:0000:0001", b"2001:db8::1"),
        (b"2001:db8:0:0:1:0:0:1", b"2001:db8::1:0:0:1"),
        (b"0:0:0:0:0:0:0:1", b"::1"),
        (b"::", b"::"),
        (b"FE80::", b"fe80::"),
        (b"::ffff:1.2.3.4", b"1.2.3.4"),  # v4-mapped: looked up by its dotted quad
        (b"::FFFF:102:304", b"1.2.3.4"),
        (b"::1.2.3.4", b"::1.2.3.4"),
        (b"joe@2001:DB8::1", b"joe@2001:db8::1"),
        (b"joe@::ffff:1.2.3.4", b"joe@1.2.3.4"),
        (b"a@b@::1", b"a@b@::1"),  # INFO runs to the last "@"
        (b"2001:DB8:", b"2001:db8:"),
        (b"2001:0db8:00a0:", b"2001:db8:a0:"),
        (b"2001:db8::1:", b"2001:db8::1:"),
        (b"joe@2001:db8:", b"joe@2001:db8:"),  # stored, never looked up (as 0.88's joe@1.2.3.)
    ],
)
def test_ipv6_keys(address: bytes, key: bytes) -> None:
    assert records(address + b':allow,X="1"\n') == [(key, b"+X=1\x00")]


# ---- CIDR ----


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (b"10.0.0.0/8", b"_0000e0g0"),
        (b"10./8", b"_0000e0g0"),
        (b"127.0.0.0/8", b"_0bcdefgh"),
        (b"127./8", b"_0bcdefgh"),
        (b"192.168.0.0/16", b"_ab000000i0k0m000"),
        (b"192.168./16", b"_ab000000i0k0m000"),
        (b"fe80::/10", b"^`abcdef0g0"),
        (b"FE80::/10", b"^`abcdef0g0"),
        (b"2002::/64", b"^00`00000000000a" + b"0" * 49),
        (b"128.0.0.0/1", b"_a"),
        (b"0.0.0.0/1", b"_0"),
        (b"1.2.3.4/32", b"_0000000h000000o0000000wx00000400"),
        (b"8000::/1", b"^`"),
        (b"::1/128", b"^" + b"0" * 127 + b"`"),
        (b"::ffff:10.0.0.0/104", b"_0000e0g0"),  # v4-mapped networks are IPv4 networks
    ],
)
def test_cidr_keys_golden(address: bytes, key: bytes) -> None:
    assert records(address + b":deny\n") == [(key, b"D\x00")]


@pytest.mark.parametrize(
    "address",
    [
        b"10.0.0.0/0", b"10.0.0.0/33", b"2001:db8::/129", b"10.0.0.0/08", b"10.0.0.0/", b"10.0.0.0/x",
        b"10.1.0.0/8", b"2001:db8::1/32", b"10/8", b"010.0.0.0/8", b"a/b", b"1.2.3.4/8/8", b"joe@10.0.0.0/8",
        b"10.0.0.0-5/24", b" 10.0.0.0/8", b"/8", b"2001:db8:/32",
    ],
)
def test_invalid_cidr_is_a_parse_error(address: bytes) -> None:
    line = address + b":deny"
    with pytest.raises(RuleSyntaxError) as raised:
        records(line + b"\n")
    assert raised.value.line == line


@pytest.mark.parametrize(
    ("address", "key"),
    [
        # A "/" in a host form or in INFO only: 0.88's verbatim key, as before.
        (b"=a/b.example", b"=a/b.example"),
        (b"joe@=a/b", b"joe@=a/b"),
        (b"a/b@1.2.3.4", b"a/b@1.2.3.4"),
        (b"a/b@1.2.3.4-5", b"a/b@1.2.3.4-5"),
    ],
)
def test_slash_outside_an_address_keeps_the_original_reading(address: bytes, key: bytes) -> None:
    assert keys(address + b":allow\n") == [key]


# ---- the lengths record ----


def test_lengths_record_written_last_and_only_with_cidr(tmp_path: Path) -> None:
    text = b"10.0.0.0/8:deny\n10.1./16:allow\n::1:allow\n2001:db8::/32:deny\n10.2.0.0/16:deny\n1.2.3.4:allow\n"
    rules = cdbx.CDB(os.fspath(compiled(tmp_path, text)))
    try:
        items = list(rules.items(all=True))
    finally:
        rules.close()
    assert items[-1] == (CIDR_LENGTHS_KEY, b"_16,8\x00^32\x00")
    assert [key for key, _ in items[:-1]] == keys(text)
    plain = tmp_path / "plain"
    plain.mkdir()
    rules = cdbx.CDB(os.fspath(compiled(plain, b"::1:allow\n2001:db8::allow\n1.2.3.4:deny\n")))
    try:
        assert rules.get(CIDR_LENGTHS_KEY) is None  # IPv6 without CIDR: no record
    finally:
        rules.close()


def test_lengths_seen_and_decoded() -> None:
    seen = add_records([b"10./8:deny\n::/1:deny\n2001:db8::/32:deny\n1.2.3.0/24:deny\n"], lambda *_: None)
    assert seen.ipv4 == {8, 24} and seen.ipv6 == {1, 32}
    assert seen.record_data() == b"_24,8\x00^32,1\x00"
    assert decode_cidr_lengths(seen.record_data()) == CidrLengths((24, 8), (32, 1))
    assert CidrLengthsSeen().record_data() is None
    assert not decode_cidr_lengths(None)
    # A hand-made record: what is not a length is ignored.
    assert decode_cidr_lengths(b"_33,0,x,8,,16\x00^129,128\x00?1\x00_4") == CidrLengths((16, 8), (128,))


# ---- the lookup ----


def test_lookup_address() -> None:
    assert lookup_address(b"1.2.3.4") == (b"1.2.3.4", None)  # parsed only when CIDR keys are probed
    assert lookup_address(b"2001:DB8::1") == (b"2001:db8::1", bytes.fromhex("20010db8" + "0" * 23 + "1"))
    assert lookup_address(b"::ffff:1.2.3.4") == (b"1.2.3.4", bytes([1, 2, 3, 4]))
    assert lookup_address(b"a:b") == (b"a:b", None)
    assert lookup_address(b"fe80::1%eth0") == (b"fe80::1%eth0", None)


def test_candidate_keys_ipv6_order() -> None:
    # IPv6 prefixes cut at ":" (and "."), then the CIDR keys longest first, then the host's.
    lengths = CidrLengths(ipv4=(8,), ipv6=(64, 32))
    assert list(candidate_keys(b"2001:db8::1", b"h.example", b"joe", lengths)) == [
        b"joe@2001:db8::1",
        b"joe@=h.example",
        b"2001:db8::1",
        b"=h.example",
        b"2001:db8::",
        b"2001:db8:",
        b"2001:",
        b"^00`000000000000a0000bc0de0fgh000" + b"0" * 32,
        b"^00`000000000000a0000bc0de0fgh000",
        b"=.example",
        b"=",
        b"",
    ]


def test_candidate_keys_ipv4_order() -> None:
    lengths = CidrLengths(ipv4=(24, 8), ipv6=(64,))
    assert list(candidate_keys(b"10.1.2.3", None, None, lengths)) == [
        b"10.1.2.3", b"10.1.2.", b"10.1.", b"10.", b"_0000e0g00000000p000000w0", b"_0000e0g0", b"",
    ]
    # v4-mapped (under -6): its dotted quad, IPv4 keys; garbage: no CIDR keys.
    assert list(candidate_keys(b"::ffff:10.1.2.3", None, None, lengths)) == list(
        candidate_keys(b"10.1.2.3", None, None, lengths)
    )
    assert list(candidate_keys(b"10.1.2", None, None, lengths)) == [b"10.1.2", b"10.1.", b"10.", b""]
    # Without recorded lengths, exactly 0.88's order.
    assert list(candidate_keys(b"10.1.2.3", None, None)) == [b"10.1.2.3", b"10.1.2.", b"10.1.", b"10.", b""]


RULES = b"""10.0.0.0/8:deny,WHY="v4/8"
10.1./16:allow,WHY="v4/16"
10.1.2.0/24:deny,WHY="v4/24"
10.1.2.3/32:allow,WHY="v4/32"
10.9.:allow,WHY="dotted"
2001:db8::/32:deny,WHY="v6/32"
2001:db8:1::/48:allow,WHY="v6/48"
2001:db8:1::1/128:deny,WHY="v6/128"
2001:db8:2::allow,WHY="colon prefix"
2001:db8::7:allow,WHY="exact"
8000::/1:deny,WHY="v6/1"
128.0.0.0/1:allow,WHY="v4/1"
=.example.com:deny,WHY="host"
"""


@pytest.mark.parametrize(
    ("ip", "host", "why"),
    [
        (b"10.200.0.1", None, b"v4/8"),
        (b"10.1.200.1", None, b"v4/16"),
        (b"10.1.2.4", None, b"v4/24"),
        (b"10.1.2.3", None, b"v4/32"),  # longest prefix wins, whatever the file order
        (b"10.9.1.1", None, b"dotted"),  # dotted prefixes come before CIDR
        (b"::ffff:10.1.2.4", None, b"v4/24"),  # v4-mapped under -6: IPv4 CIDR
        (b"11.0.0.1", None, None),
        (b"200.0.0.1", None, b"v4/1"),  # /1 matches (ucspi-tcp6 never probes it)
        (b"2001:db8:ffff::1", None, b"v6/32"),
        (b"2001:db8:1:ffff::1", None, b"v6/48"),
        (b"2001:db8:1::1", None, b"v6/128"),
        (b"2001:DB8:1:0::1", None, b"v6/128"),  # any spelling (tcprulescheck)
        (b"2001:db8:2:3::1", None, b"colon prefix"),  # the IPv6 build's prefix, before CIDR
        (b"2001:db8::7", None, b"exact"),
        (b"fe80::1", None, b"v6/1"),
        (b"::1", None, None),
        (b"10.200.0.1", b"a.example.com", b"v4/8"),  # CIDR before host suffixes (docs/behaviour.md §8.2)
        (b"11.0.0.1", b"a.example.com", b"host"),
    ],
)
def test_find_rule(tmp_path: Path, ip: bytes, host: bytes | None, why: bytes | None) -> None:
    rules_file = RulesFile(os.fsencode(compiled(tmp_path, RULES)))
    try:
        decision = rules_file.decide(ip, host, None)
    finally:
        rules_file.close()
    assert decision.environment == ([(b"WHY", why)] if why is not None else [])
    # The same answer from a plain getter, lengths read on the way.
    reader = cdbx.CDB(os.fspath(tmp_path / "rules.cdb"))
    try:
        assert find_rule(reader.get, ip, host, None) == decision
    finally:
        reader.close()


def test_rules_file_rereads_lengths_when_the_file_changes(tmp_path: Path) -> None:
    path = compiled(tmp_path, b"10.0.0.0/8:deny\n")
    rules_file = RulesFile(os.fsencode(path))
    try:
        assert rules_file.decide(b"10.1.2.3", None, None).deny
        compiled(tmp_path, b"10.1.0.0/16:deny\n")
        assert rules_file.decide(b"10.1.2.3", None, None).key == b"_0000e0g00000000p"
        assert rules_file.decide(b"10.2.0.1", None, None).key is None
    finally:
        rules_file.close()


def test_describe_shows_the_network() -> None:
    assert describe(Decision(b"_0000e0g0", b"D\x00", cidr=True)) == b"rule 10.0.0.0/8:\ndeny connection\n"
    assert describe(Decision(b"^00`000000000000a0000bc0de0fgh000", b"+A=1\x00", cidr=True)) == (
        b"rule 2001:db8::/32:\nset environment variable A=1\nallow connection\n"
    )
    # The same bytes as a plain key (a 0.88 rule `_0000e0g0:deny`, matched as an IP): shown as is.
    assert describe(Decision(b"_0000e0g0", b"D\x00")) == b"rule _0000e0g0:\ndeny connection\n"


# ---- no input hangs the compiler ----

HOSTILE_LINES = [
    b":" * 100_000 + b"allow",
    b"::" * 50_000 + b"1:allow",
    b"1" + b":1" * 50_000 + b":allow",
    b"a:" * 50_000,
    b"/" * 100_000 + b":allow",
    b"1.2.3.4/" + b"9" * 100_000 + b":allow",
    b"::/" + b"1" * 100_000 + b":deny",
    b"10." * 30_000 + b"/8:deny",
    b":allo" * 30_000,
    b":allow" * 30_000 + b"x",
    b"2001:db8::1:allow:deny:allow:deny" * 10_000,
    b" \t" * 50_000,
    b"-" * 100_000 + b":allow",
    b"@" * 100_000 + b"::1:allow",
]


@pytest.mark.parametrize("line", HOSTILE_LINES, ids=range(len(HOSTILE_LINES)))
def test_hostile_lines_end_quickly(line: bytes) -> None:
    started = time.monotonic()
    try:
        records(line + b"\n")
    except RuleSyntaxError:
        pass
    assert time.monotonic() - started < 2.0


def test_our_tcprules_ends_on_lines_the_ipv6_build_loops_on(tmp_path: Path) -> None:
    # The Debian IPv6 tcprules loops forever on these (docs/behaviour.md §8.1); ours skips or rejects them.
    for text, exit_code in [(b"no colon\n", 0), (b"   \n", 0), (b"1.2.3.4:bad\n", 100)]:
        try:
            finished = run_command([our_command("tcprules"), "rules.cdb", "rules.tmp"], text, cwd=tmp_path)
        except subprocess.TimeoutExpired:  # pragma: no cover - the failure this test is about
            pytest.fail(f"tcprules did not end on {text!r}")
        assert finished.returncode == exit_code


# ---- our commands end to end ----


def test_tcprules_and_tcprulescheck(tmp_path: Path) -> None:
    finished = run_command([our_command("tcprules"), "rules.cdb", "rules.tmp"], RULES, cwd=tmp_path)
    assert (finished.returncode, finished.stderr) == (0, b"")

    def check(ip: bytes) -> bytes:
        environment = command_environment({b"TCPREMOTEIP": ip})
        result = run_command([our_command("tcprulescheck"), "rules.cdb"], cwd=tmp_path, environment=environment)
        assert (result.returncode, result.stderr) == (0, b"")
        return result.stdout

    assert check(b"10.1.2.4") == b"rule 10.1.2.0/24:\ndeny connection\n"
    assert check(b"2001:db8:1:ffff::1") == (
        b"rule 2001:db8:1::/48:\nset environment variable WHY=v6/48\nallow connection\n"
    )
    assert check(b"2001:DB8::7") == b"rule 2001:db8::7:\nset environment variable WHY=exact\nallow connection\n"
    assert check(b"2001:db8:2:3::1") == (
        b"rule 2001:db8:2::\nset environment variable WHY=colon prefix\nallow connection\n"
    )
    assert check(b"::ffff:10.9.0.1") == b"rule 10.9.:\nset environment variable WHY=dotted\nallow connection\n"
    assert check(b"::1") == b"default:\nallow connection\n"

    bad = run_command([our_command("tcprules"), "rules.cdb", "rules.tmp"], b"10.1.0.0/8:deny\n", cwd=tmp_path)
    assert (bad.returncode, bad.stderr) == (100, b"tcprules: fatal: unable to parse this line: 10.1.0.0/8:deny\n")
