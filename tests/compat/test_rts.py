"""The tcprules/tcprulescheck part of ucspi-tcp 0.88's regression suite (rts), run on our commands.

The script below follows the upstream `rts.tests` section (docs/behaviour.md §7), retold in Python: each step
is a heading, a command, or a command whose exit code is echoed. As in `rts.sh`, commands get
an environment holding only PATH (plus the step's own TCPREMOTE* variables), stderr is merged
into stdout, and the whole output goes through `cat -v`. The expected output,
tests/data/rts/tcprules.exp, was written by this script run against the original:

    .venv/bin/python tests/compat/test_rts.py --write-expected
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = ROOT / "tests" / "data" / "rts" / "tcprules.exp"
OURS = {"tcprules": ROOT / "bin" / "tcprules", "tcprulescheck": ROOT / "bin" / "tcprulescheck"}
ORIGINAL = {"tcprules": Path("/usr/bin/tcprules"), "tcprulescheck": Path("/usr/bin/tcprulescheck")}


@dataclass(frozen=True)
class Step:
    """`echo HEADING`, or `[echo STDIN |] [env VARS] PROGRAM ARGS[; echo $?]`."""

    heading: str = ""
    program: str = ""
    args: tuple[str, ...] = ()
    stdin: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    echo_status: bool = False


def heading(text: str) -> Step:
    return Step(heading=text)


def rules(text: str, *args: str) -> Step:
    """`echo 'TEXT' | tcprules ARGS; echo $?` (echo adds the final newline)."""
    args = args or ("test.cdb", "test.tmp")
    return Step(program="tcprules", args=args, stdin=text.encode() + b"\n", echo_status=True)


def check(echo_status: bool = False, **env: str) -> Step:
    """`env VARS tcprulescheck test.cdb`, with `; echo $?` where the script has it."""
    return Step(program="tcprulescheck", args=("test.cdb",), env=env, echo_status=echo_status)


def order_check(ip: str, host: str | None = None, info: str | None = None) -> Step:
    env = {"TCPREMOTEIP": ip}
    if host is not None:
        env["TCPREMOTEHOST"] = host
    if info is not None:
        env["TCPREMOTEINFO"] = info
    return check(**env)


SCRIPT: list[Step] = [
    heading("--- tcprules prints usage message without enough arguments"),
    Step(program="tcprules", args=("test.cdb",), echo_status=True),
    heading("--- tcprules prints error message if it cannot create tmp"),
    rules("1.2.3.4:deny", "test.cdb", "/dev/nonexistent/tmp"),
    heading("--- tcprules prints error message if it cannot move tmp to cdb"),
    rules("1.2.3.4:deny", "/dev/nonexistent/cdb", "test.tmp"),
    heading("--- tcprules creates a cdb file"),
    rules("1.2.3.4:deny"),
    heading("--- tcprulescheck sees deny"),
    check(True, TCPREMOTEIP="1.2.3.4"),
    heading("--- tcprulescheck does not apply deny to another host"),
    check(True, TCPREMOTEIP="1.2.3.5"),
    heading("--- tcprules replaces a cdb file"),
    rules(
        "joe@127.0.0.1:allow,which=/first/\n"
        '18.23.0.32:allow,which="second"\n'
        "127.:allow,which=+third+\n"
        ":allow,which==fourth="
    ),
    heading("--- tcprulescheck finds rule with address and info"),
    check(True, TCPREMOTEIP="127.0.0.1", TCPREMOTEINFO="joe"),
    heading("--- tcprulescheck finds rule with address"),
    check(True, TCPREMOTEIP="18.23.0.32", TCPREMOTEINFO="joe"),
    heading("--- tcprulescheck finds one-dot wildcard"),
    check(True, TCPREMOTEIP="127.0.0.1", TCPREMOTEINFO="bill"),
    heading("--- tcprulescheck finds zero-dot wildcard"),
    check(True, TCPREMOTEIP="10.119.75.39", TCPREMOTEINFO="bill"),
    heading("--- tcprules handles comments, address ranges, multiple variables"),
    rules("127.0-5.:allow,which=/first/,where=/whatever/\n# comment"),
    *(check(TCPREMOTEIP=f"127.{n}.0.1") for n in range(11)),
    heading("--- tcprules handles host names"),
    rules("=known.edu:allow,which=/known/\n=.abuser.edu:deny\n:allow,which=/anybody/"),
    *(
        check(TCPREMOTEIP="1.2.3.4", TCPREMOTEHOST=host)
        for host in ("known.edu", "random.edu", "abuser.edu", "x.abuser.edu", "x.y.abuser.edu")
    ),
    heading("--- tcprulescheck searches for rules in the proper order"),
    rules(
        "xyz@86.75.30.9:allow,which=/first/\n"
        "xyz@=one.two.three:allow,which=/second/\n"
        "86.75.30.9:allow,which=/third/\n"
        "=one.two.three:allow,which=/fourth/\n"
        "86.75.30.:allow,which=/fifth/\n"
        "86.75.:allow,which=/sixth/\n"
        "86.:allow,which=/seventh/\n"
        "=.two.three:allow,which=/eighth/\n"
        "=.three:allow,which=/ninth/\n"
        "=:allow,which=/tenth/\n"
        ":allow,which=/eleventh/\n"
    ),
    order_check("86.75.30.9", "one.two.three", "xyz"),
    order_check("86.75.30.9", info="xyz"),
    order_check("86.75.30.10", "one.two.three", "xyz"),
    order_check("86.75.30.9", "one.two.three", "abc"),
    order_check("86.75.30.9", info="abc"),
    order_check("86.75.30.9", "one.two.three"),
    order_check("86.75.30.9"),
    order_check("86.75.30.10", "one.two.three", "abc"),
    order_check("86.75.30.10", "one.two.three"),
    order_check("86.75.30.10", "four.two.three"),
    order_check("86.75.30.10"),
    order_check("86.75.20.10", "four.two.three", "abc"),
    order_check("86.75.20.10", info="abc"),
    order_check("86.75.20.10", "four.two.three"),
    order_check("86.75.20.10"),
    order_check("86.85.20.10", "four.two.three", "abc"),
    order_check("86.85.20.10", info="abc"),
    order_check("86.85.20.10", "four.two.three"),
    order_check("86.85.20.10"),
    order_check("96.85.20.10", "four.two.three", "abc"),
    order_check("96.85.20.10", "four.two.three"),
    order_check("96.85.20.10", "four.three", "abc"),
    order_check("96.85.20.10", "four.three"),
    order_check("96.85.20.10", "four", "abc"),
    order_check("96.85.20.10", "four"),
    order_check("96.85.20.10", info="abc"),
    order_check("96.85.20.10"),
]


def cat_v(data: bytes) -> bytes:
    """`cat -v`: control bytes as ^X, DEL as ^?, high bytes as M- plus the same for the low 7 bits."""
    out = bytearray()
    for byte in data:
        if byte >= 0x80:
            out += b"M-"
            byte -= 0x80
        if byte == 0x7F:
            out += b"^?"
        elif byte < 0x20 and byte not in (0x09, 0x0A):
            out += b"^" + bytes([byte + 0x40])
        else:
            out.append(byte)
    return bytes(out)


def run_script(commands: dict[str, Path], cwd: Path) -> bytes:
    output = bytearray()
    for step in SCRIPT:
        if step.heading:
            output += step.heading.encode() + b"\n"
            continue
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")} | step.env
        result = subprocess.run(
            [commands[step.program], *step.args],
            input=step.stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # like 2>&1: each program writes only one of them anyway
            cwd=cwd,
            env=env,
        )
        output += result.stdout
        if step.echo_status:
            output += b"%d\n" % result.returncode
    return cat_v(bytes(output))


def test_cat_v() -> None:
    assert cat_v(b"a\r\n\t\x00\x7f\xff\xe9") == b"a^M\n\t^@^?M-^?M-i"


def _rts_lookup_keys(ip: str, host: str | None, info: str | None) -> list[str]:
    """The keys 0.88's rules.c tries, in order (docs/behaviour.md §5), written out independently."""
    keys = []
    if info is not None:
        keys.append(f"{info}@{ip}")
        if host is not None:
            keys.append(f"{info}@={host}")
    keys.append(ip)
    if host is not None:
        keys.append(f"={host}")
    keys += [ip[: position + 1] for position in range(len(ip) - 1, -1, -1) if ip[position] == "."]
    if host is not None:
        keys += [f"={host[position:]}" for position in range(len(host)) if host[position] == "."]
        keys.append("=")
    return [*keys, ""]


def test_the_order_test_expects_what_the_lookup_order_predicts() -> None:
    """The expected file (written by the original) against rules.c's order, case by case.

    The 27 lookups of rts.tests' order test, in the order given, each must find the rule the
    lookup order predicts among the 11 rules: a script step lost, swapped or given the wrong
    variables, or an expected file that is not the original's, fails here.
    """
    order = SCRIPT.index(heading("--- tcprulescheck searches for rules in the proper order"))
    rules_step, lookups = SCRIPT[order + 1], SCRIPT[order + 2 :]
    assert len(lookups) == 27
    assert sum(step.env.get("TCPREMOTEIP", "").startswith("127.") and not step.echo_status for step in SCRIPT) == 11
    rules = {}
    for line in filter(None, rules_step.stdin.decode().splitlines()):
        address, _, instruction = line.rpartition(":allow,which=/")
        rules[address] = instruction.rstrip("/")
    assert len(rules) == 11
    expected = EXPECTED.read_text().split("--- tcprulescheck searches for rules in the proper order\n0\n", 1)[1]
    predicted = ""
    for step in lookups:
        env = step.env
        keys = _rts_lookup_keys(env["TCPREMOTEIP"], env.get("TCPREMOTEHOST"), env.get("TCPREMOTEINFO"))
        key = next(key for key in keys if key in rules)
        predicted += f"rule {key}:\nset environment variable which={rules[key]}\nallow connection\n"
    assert expected == predicted
    # Every one of the 11 rules is the answer at least once: the test exercises each step.
    assert {line[5:-1] for line in predicted.splitlines() if line.startswith("rule ")} == set(rules)


def test_rts_ours(tmp_path: Path) -> None:
    assert run_script(OURS, tmp_path).decode() == EXPECTED.read_text()


@pytest.mark.skipif(not ORIGINAL["tcprules"].exists(), reason="the original ucspi-tcp is not installed")
def test_rts_original_agrees(tmp_path: Path) -> None:
    """Guards the expected file itself: the original must still produce it byte for byte."""
    assert run_script(ORIGINAL, tmp_path) == EXPECTED.read_bytes()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-expected"]:
        sys.exit(f"usage: {sys.argv[0]} --write-expected")
    with tempfile.TemporaryDirectory() as scratch:
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        EXPECTED.write_bytes(run_script(ORIGINAL, Path(scratch)))
    print(f"wrote {EXPECTED}")
