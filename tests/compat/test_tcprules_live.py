"""Our tcprules and tcprulescheck against the original, side by side, on generated input.

Properties (hypothesis, profile `ucspi-fuzz`; UCSPI_FUZZ_EXAMPLES=5000 for a long run):
- a rules file from the grammar, or raw bytes biased toward the syntax's characters, gives the
  same exit code, the same stderr bytes, the same cdb bytes (or none) and the same files left;
- a compiled file and a client (TCPREMOTEIP/HOST/INFO, each unset, empty or set) give the same
  tcprulescheck report and exit code.
Lines that README, differences item 5 lets us read differently (IPv6, CIDR) are dropped from the input.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cdbx
import pytest
from conftest import (
    FUZZ,
    command_environment,
    host_names,
    ip_strings,
    octets,
    original_command,
    our_command,
    raw_rule_files,
    rule_files,
    run_command,
    user_names,
    without_extended_syntax,
)
from hypothesis import currently_in_test_context, example, given, note
from hypothesis import strategies as st

ORIGINAL_TCPRULES = original_command("tcprules")
ORIGINAL_TCPRULESCHECK = original_command("tcprulescheck")

pytestmark = pytest.mark.skipif(
    ORIGINAL_TCPRULES is None or ORIGINAL_TCPRULESCHECK is None,
    reason="the original ucspi-tcp 0.88 is not installed (/usr/bin/tcprules, /usr/bin/tcprulescheck;"
    " Debian package ucspi-tcp)",
)

# Both programs get the same names, relative to their own directory, so messages compare equal.
CDB = "rules.cdb"
TMP = "rules.tmp"


@dataclass(frozen=True)
class TcprulesRun:
    exit_code: int
    stderr: bytes
    cdb: bytes | None
    files: tuple[str, ...]  # what is left in the directory: TMP stays behind on failure (docs/behaviour.md §3.2)


def run_tcprules(command: Path, text: bytes) -> TcprulesRun:
    with tempfile.TemporaryDirectory(prefix="tcprules-") as directory:
        finished = run_command([command, CDB, TMP], text, cwd=directory)
        cdb_path = Path(directory) / CDB
        return TcprulesRun(
            exit_code=finished.returncode,
            stderr=finished.stderr,
            cdb=cdb_path.read_bytes() if cdb_path.exists() else None,
            files=tuple(sorted(os.listdir(directory))),
        )


def assert_tcprules_agree(text: bytes) -> TcprulesRun:
    text = without_extended_syntax(text)
    if currently_in_test_context():
        note(f"rules text: {text!r}")
    assert ORIGINAL_TCPRULES is not None
    theirs = run_tcprules(ORIGINAL_TCPRULES, text)
    ours = run_tcprules(our_command("tcprules"), text)
    # Outcome first, so that a failure shows the messages rather than two 2 kB cdb files.
    assert (ours.exit_code, ours.stderr, ours.files) == (theirs.exit_code, theirs.stderr, theirs.files)
    assert ours.cdb == theirs.cdb
    return theirs


# Fixed cases hypothesis always runs: number edges the spec does not list, checked here live.
@FUZZ
@example(b"1\x00x-3:allow\n")  # scan_ulong stops at the NUL: bottom 1
@example(b"18446744073709551617-3:allow\n")  # 2**64 + 1 wraps to 1
@example(b"1.2.3.0-18446744073709551616:allow\n")  # top wraps to 0
@example(b"99999999999999999999-1:allow\n")
@example(b"1.2.3.0-" + b"9" * 8190 + b":allow\n")  # over int()'s 4,300 digits (make fuzz)
@example(b"1.2.3.4:allow\r\n5.6.7.8:deny\n")
@example(b"1.2\x003.4:bad\n")
@example(b"\xff-\xfe:allow\n")
@example(b'-:deny,X=\x00a\x00,Y= b \n#\n \t\nno colon\n:allow,="",A,B="x"')
@given(rule_files(valid_only=False))
def test_tcprules_agrees_on_grammar_files(text: bytes) -> None:
    assert_tcprules_agree(text)


@FUZZ
@given(raw_rule_files())
def test_tcprules_agrees_on_raw_bytes(text: bytes) -> None:
    assert_tcprules_agree(text)


def large_rules_file(seed: int) -> bytes:
    """About 300 kB of mixed lines, one of them longer than a read block (ours reads 64 kB)."""
    chooser = random.Random(seed)
    lines = []
    for number in range(6000):
        octet = chooser.randrange(256)
        lines.append(
            chooser.choice(
                [
                    b"10.%d.%d.%d:allow,RELAYCLIENT=\"\"" % (octet, number % 256, number // 256),
                    b"192.168.%d.%d-%d:deny" % (octet, octet, chooser.randrange(300)),
                    b"=host%d.example.com:allow,X=/a,b:c/ \t" % number,
                    b"# comment %d" % number,
                    b"",
                    b"joe@10.0.0.%d:deny,Y=\x00\r\x00" % octet,
                    b"no colon %d" % number,
                ]
            )
        )
    lines.insert(chooser.randrange(len(lines)), b":allow,LONG=|" + b"v" * 150_000 + b"|")
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(
    "tail", [b"", b"1.2.3.4:allow,\n", b"1.2.3.4:allow"], ids=["valid", "bad-last-line", "no-newline"]
)
def test_tcprules_agrees_on_a_large_file(seed: int, tail: bytes) -> None:
    result = assert_tcprules_agree(large_rules_file(seed) + tail)
    assert result.exit_code == (100 if tail.endswith(b",\n") else 0)  # the file is what we meant it to be


# ---- tcprulescheck ----

CLIENT_VARIABLES = (b"TCPREMOTEIP", b"TCPREMOTEHOST", b"TCPREMOTEINFO")


def maybe(values: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes | None]:
    """Unset, empty, or a value (set-but-empty differs from unset for host and info, docs/behaviour.md §4)."""
    return st.one_of(st.none(), st.just(b""), values)


def without_nul(value: bytes | None) -> bytes | None:
    """Environment strings cannot hold a NUL."""
    return None if value is None else value.replace(b"\x00", b"")


@st.composite
def clients(draw: st.DrawFn, keys: list[bytes]) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(ip, host, info) for tcprulescheck, often aimed at a key of the file so that rules match."""
    anything = st.binary(max_size=10)
    ip = draw(maybe(st.one_of(ip_strings(), anything)))
    host = draw(maybe(st.one_of(host_names(), anything)))
    info = draw(maybe(st.one_of(user_names(), anything)))
    if keys and draw(st.booleans()):
        key = draw(st.sampled_from(keys))
        user, at, address = key.partition(b"@")
        if at:
            info = user
        else:
            address = key
        if address.startswith(b"="):
            host = address[1:]
            if host.startswith(b".") or not host:
                host = draw(host_names()) + host  # a host under the suffix, or any host for `=`
        else:
            ip = address
            if ip.endswith(b".") or not ip:
                ip += draw(octets())  # an address under the prefix
    return without_nul(ip), without_nul(host), without_nul(info)


def run_tcprulescheck(command: Path, directory: str, client: tuple[bytes | None, ...]) -> tuple[int, bytes, bytes]:
    variables = {name: value for name, value in zip(CLIENT_VARIABLES, client, strict=True) if value is not None}
    finished = run_command([command, CDB], cwd=directory, environment=command_environment(variables))
    return finished.returncode, finished.stdout, finished.stderr


@FUZZ
@given(st.data(), rule_files(valid_only=True))
def test_tcprulescheck_agrees(data: st.DataObject, text: bytes) -> None:
    text = without_extended_syntax(text)
    note(f"rules text: {text!r}")
    assert ORIGINAL_TCPRULES is not None and ORIGINAL_TCPRULESCHECK is not None
    with tempfile.TemporaryDirectory(prefix="tcprulescheck-") as directory:
        compiled = run_command([ORIGINAL_TCPRULES, CDB, TMP], text, cwd=directory)
        # The grammar's valid files must be valid for the original too.
        assert (compiled.returncode, compiled.stderr) == (0, b"")
        rules = cdbx.CDB(os.path.join(directory, CDB))
        try:
            keys = sorted({key for key, _ in rules.items(all=True)})
        finally:
            rules.close()
        for client in data.draw(st.lists(clients(keys), min_size=1, max_size=3), label="clients"):
            theirs = run_tcprulescheck(ORIGINAL_TCPRULESCHECK, directory, client)
            ours = run_tcprulescheck(our_command("tcprulescheck"), directory, client)
            assert ours == theirs, f"client {client!r}"
