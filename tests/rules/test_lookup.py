"""The rule lookup shared by tcpserver and tcprulescheck (docs/behaviour.md §4 and 5), in-process.

Plus a regression test run through our commands: a key whose djb hash is 0 (docs/behaviour.md §2.2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cdbx
import pytest
from conftest import command_environment, djb_hash, original_command, our_command, run_command

from ucspi.rules.compile import compile_rules
from ucspi.rules.lookup import NO_RULE, Decision, candidate_keys, describe, find_rule

# ---- docs/behaviour.md §5: the order of the candidate keys ----


def test_candidate_keys_full_example() -> None:
    # The verification run of docs/behaviour.md §5: IP 1.2.3.4, host a.b.example.com, info joe.
    assert list(candidate_keys(b"1.2.3.4", b"a.b.example.com", b"joe")) == [
        b"joe@1.2.3.4",
        b"joe@=a.b.example.com",
        b"1.2.3.4",
        b"=a.b.example.com",
        b"1.2.3.",
        b"1.2.",
        b"1.",
        b"=.b.example.com",
        b"=.example.com",
        b"=.com",
        b"=",
        b"",
    ]


def test_candidate_keys_ip_only() -> None:
    assert list(candidate_keys(b"1.2.3.4", None, None)) == [b"1.2.3.4", b"1.2.3.", b"1.2.", b"1.", b""]


def test_candidate_keys_info_without_host() -> None:
    # INFO@=HOST needs a host; `=` and the suffixes are tried only when a host is set.
    assert list(candidate_keys(b"10.0.0.1", None, b"joe")) == [
        b"joe@10.0.0.1", b"10.0.0.1", b"10.0.0.", b"10.0.", b"10.", b"",
    ]


def test_candidate_keys_empty_host_tries_equals_twice() -> None:
    # An empty host is a host: step 4 looks up `=`, step 7 looks it up again (docs/behaviour.md §5).
    assert list(candidate_keys(b"1.2.3.4", b"", None)) == [b"1.2.3.4", b"=", b"1.2.3.", b"1.2.", b"1.", b"=", b""]


def test_candidate_keys_empty_info() -> None:
    assert list(candidate_keys(b"1.2.3.4", b"h", b""))[:2] == [b"@1.2.3.4", b"@=h"]
    assert list(candidate_keys(b"1.2.3.4", None, b""))[:2] == [b"@1.2.3.4", b"1.2.3.4"]


def test_candidate_keys_any_string_as_ip() -> None:
    # The prefix scan works on any string: `abc.def` tries `abc.` (docs/behaviour.md §5 step 5).
    assert list(candidate_keys(b"abc.def", None, None)) == [b"abc.def", b"abc.", b""]
    # An empty IP is looked up as the IP, then again as the empty key.
    assert list(candidate_keys(b"", None, None)) == [b"", b""]
    # tcprulescheck's default IP when TCPREMOTEIP is unset (docs/behaviour.md §4).
    assert list(candidate_keys(b"0.0.0.0", None, None)) == [b"0.0.0.0", b"0.0.0.", b"0.0.", b"0.", b""]


def test_candidate_keys_host_without_dots_and_with_a_leading_dot() -> None:
    assert list(candidate_keys(b"1", b"localhost", None)) == [b"1", b"=localhost", b"=", b""]
    assert list(candidate_keys(b"1", b".a", None)) == [b"1", b"=.a", b"=.a", b"=", b""]


# ---- find_rule: the first candidate present wins ----


def test_find_rule_takes_the_first_candidate_present() -> None:
    rules = {b"": b"D\x00", b"=": b"+X=eq\x00", b"1.2.": b"+X=prefix\x00", b"=.example.com": b""}
    decision = find_rule(rules.get, b"1.2.3.4", b"a.example.com", None)
    assert decision == Decision(b"1.2.", b"+X=prefix\x00")
    # Without a host, neither `=` form can match: the prefix still wins, then the empty key.
    assert find_rule(rules.get, b"9.9.9.9", None, None) == Decision(b"", b"D\x00")
    assert find_rule(rules.get, b"9.9.9.9", b"", None) == Decision(b"=", b"+X=eq\x00")
    assert find_rule(rules.get, b"9.9.9.9", b"x.example.com", None) == Decision(b"=.example.com", b"")


def test_find_rule_never_matches_decoys() -> None:
    # Keys that look plausible but are never looked up (docs/behaviour.md §3.3 note, docs/behaviour.md §5).
    decoys = {b"joe@=.example.com": b"", b"=a.b": b"", b"1.2.3": b"", b"joe@": b"", b"@1.2.3.4": b"",
              b"joe@1.2.3.": b"", b"=A.EXAMPLE.COM": b""}
    assert find_rule(decoys.get, b"1.2.3.4", b"a.example.com", b"joe") is NO_RULE


def test_find_rule_with_empty_data_is_a_rule_not_the_default() -> None:
    decision = find_rule({b"": b""}.get, b"1.2.3.4", None, None)
    assert decision.key == b""
    assert describe(decision) == b"rule :\nallow connection\n"


def test_find_rule_in_a_compiled_cdb_first_duplicate_wins(tmp_path: Path) -> None:
    # Example 7 of docs/behaviour.md §3.5: both records are stored, the first in the file is the one found.
    source = tmp_path / "rules.txt"
    source.write_bytes(b'1.2.3.4:allow,A="1"\n1.2.3.4:deny\n127.:deny,X="y"\n')
    with source.open("rb") as rules_text:
        compile_rules(rules_text.fileno(), os.fsencode(tmp_path / "rules.cdb"), os.fsencode(tmp_path / "rules.tmp"))
    rules = cdbx.CDB(os.fsencode(tmp_path / "rules.cdb"))
    try:
        assert find_rule(rules.get, b"1.2.3.4", None, None) == Decision(b"1.2.3.4", b"+A=1\x00")
        denied = find_rule(rules.get, b"127.0.0.1", b"localhost", b"joe")
        assert describe(denied) == b"rule 127.:\ndeny connection\n"
        assert find_rule(rules.get, b"9.9.9.9", None, None) is NO_RULE
    finally:
        rules.close()


# ---- Decision ----


def test_decision_chunks_ignore_a_trailing_chunk_without_nul() -> None:
    assert list(Decision(b"k", b"+A=1\x00+B=2").chunks()) == [b"+A=1"]
    assert list(Decision(b"k", b"").chunks()) == []
    assert list(Decision(b"k", b"\x00\x00").chunks()) == [b"", b""]


def test_decision_deny_and_environment() -> None:
    allow = Decision(b"k", b"+RELAYCLIENT=\x00+TCPLOCALHOST=movie.edu\x00")
    assert not allow.deny
    assert allow.environment == [(b"RELAYCLIENT", b""), (b"TCPLOCALHOST", b"movie.edu")]
    # tcpserver marks deny wherever the D chunk is, and still reads every variable.
    deny = Decision(b"k", b"+A=1\x00D\x00+B=2\x00")
    assert deny.deny
    assert deny.environment == [(b"A", b"1"), (b"B", b"2")]
    assert Decision(b"k", b"D\x00").deny
    assert not Decision(b"k", b"D").deny  # no NUL: not a chunk
    assert not NO_RULE.deny and NO_RULE.environment == []


def test_decision_environment_skips_other_chunks_and_plus_without_equals() -> None:
    decision = Decision(b"k", b"X=1\x00+NOEQUALS\x00+V=a=b\x00A\x00")
    assert decision.environment == [(b"V", b"a=b")]  # the value runs from the first '='
    assert not decision.deny


# ---- describe: tcprulescheck's output (docs/behaviour.md §4) ----


@pytest.mark.parametrize(
    ("decision", "report"),
    [
        (NO_RULE, b"default:\nallow connection\n"),
        (Decision(b"1.2.3.4", b"+A=1\x00"), b"rule 1.2.3.4:\nset environment variable A=1\nallow connection\n"),
        (Decision(b"127.", b"D\x00+X=y\x00"), b"rule 127.:\ndeny connection\n"),
        (Decision(b"", b"D\x00"), b"rule :\ndeny connection\n"),
        # Deny stops the report at once, after the variables before it.
        (Decision(b"k", b"+A=1\x00D\x00+B=2\x00"), b"rule k:\nset environment variable A=1\ndeny connection\n"),
        # A `+` chunk is printed verbatim even without '='; other chunks and a NUL-less tail are not.
        (Decision(b"k", b"+NOEQ\x00X\x00+B=2"), b"rule k:\nset environment variable NOEQ\nallow connection\n"),
        (Decision(b"=", b"+=x\x00"), b"rule =:\nset environment variable =x\nallow connection\n"),
    ],
)
def test_describe(decision: Decision, report: bytes) -> None:
    assert describe(decision) == report


# ---- regression: a key whose djb hash is 0 (docs/behaviour.md §2.2) ----

HASH_ZERO_RULES = b'39tcag8f:allow,A="zero"\naaami:deny\n'


def test_hash_zero_keys_really_collide() -> None:
    # The point of the pair: 39tcag8f hashes to 0 and aaami lands on the same slot of bucket 0,
    # so a writer that takes hash 0 for an empty slot loses the first rule.
    assert djb_hash(b"39tcag8f") == 0
    other = djb_hash(b"aaami")
    assert other != 0 and other & 255 == 0
    assert (other >> 8) % 4 == 0  # two records in the bucket: 4 slots, the same start slot as hash 0


@pytest.mark.parametrize("text", [HASH_ZERO_RULES, b'aaami:deny\n39tcag8f:allow,A="zero"\n'])
def test_hash_zero_key_is_compiled_and_found_by_our_commands(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        compiled = run_command([our_command("tcprules"), "rules.cdb", "rules.tmp"], text, cwd=directory)
        assert (compiled.returncode, compiled.stderr) == (0, b"")
        for ip, report in [
            (b"39tcag8f", b"rule 39tcag8f:\nset environment variable A=zero\nallow connection\n"),
            (b"aaami", b"rule aaami:\ndeny connection\n"),
        ]:
            checked = run_command(
                [our_command("tcprulescheck"), "rules.cdb"],
                cwd=directory,
                environment=command_environment({b"TCPREMOTEIP": ip}),
            )
            assert (checked.returncode, checked.stdout, checked.stderr) == (0, report, b"")
        ours = (Path(directory) / "rules.cdb").read_bytes()
        tcprules = original_command("tcprules")
        if tcprules is not None:
            reference = run_command([tcprules, "rules.cdb", "rules.tmp"], text, cwd=directory)
            assert reference.returncode == 0
            assert (Path(directory) / "rules.cdb").read_bytes() == ours
