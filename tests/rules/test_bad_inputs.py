"""The README's table of bad inputs (section "Reliability"), row by row.

Each tcprules row runs over an existing cdb, which must keep its bytes and its inode whenever
the run fails; rows where the original behaves alike run against it too. Rows the README lists
that test_failures.py already covers (usage, unwritable directories, a cdb that is a directory,
TMP on another filesystem, stdin a directory, tcprulescheck on a missing, unreadable, garbage,
empty or directory cdb) are not repeated here.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cdbx
import pytest
from test_failures import BOTH, NOBODY, OURS, Commands, Existing, Result, existing_cdb, needs_root, run, workdir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from scenarios import CAT_ENVIRON, talk_in_turn
from serverproc import OUR_SERVER, rules_cdb, start_server

__all__ = ["workdir"]  # the fixture, imported for its name

MEGABYTE = 1 << 20
PARSE = b"tcprules: fatal: unable to parse this line: "


@dataclass(frozen=True)
class BadInput:
    """A rules text, the exit code and stderr tcprules gives, and the records of the new cdb."""

    stdin: bytes
    exit_code: int
    stderr: bytes
    records: list[tuple[bytes, bytes]] | None = None  # None: failed, the old cdb stays


def _keys(*keys: bytes, data: bytes = b"") -> list[tuple[bytes, bytes]]:
    return [(key, data) for key in keys]


_LONG_VALUE = b"v" * MEGABYTE
_LONG_BAD = b"1.2.3.4:allow," + b"x" * MEGABYTE

# Rows of the README's table, in its order.
BAD_INPUTS: dict[str, BadInput] = {
    "crlf-rule": BadInput(b"1.2.3.4:allow\r\n", 100, PARSE + b"1.2.3.4:allow\r\n"),
    "crlf-value": BadInput(b'1.2.3.4:allow,X="y"\r\n', 100, PARSE + b'1.2.3.4:allow,X="y"\r\n'),
    "crlf-comments-and-blanks": BadInput(b"# rules\r\n\r\n1.2.3.4:allow\n", 0, b"", _keys(b"1.2.3.4")),
    "nul-in-bad-line": BadInput(b"1.2\x003.4:bad\n", 100, PARSE + b"1.2\n"),
    "nul-in-rule": BadInput(b'1.2.3.4:allow,X="a\x00b"\n', 0, b"", _keys(b"1.2.3.4", data=b"+X=a\x00b\x00")),
    "only-nuls": BadInput(b"\x00" * 4096, 0, b"", []),
    "invalid-utf8": BadInput(
        b"\xff\xfe:allow\n=\xc3\x28:deny\n", 0, b"", [(b"\xff\xfe", b""), (b"=\xc3\x28", b"D\x00")]
    ),
    "1mb-rule": BadInput(
        b':allow,LONG="' + _LONG_VALUE + b'"\n', 0, b"", _keys(b"", data=b"+LONG=" + _LONG_VALUE + b"\x00")
    ),
    "1mb-bad-line": BadInput(_LONG_BAD + b"\n", 100, PARSE + _LONG_BAD + b"\n"),
    "1mb-no-colon": BadInput(b"x" * MEGABYTE + b"\n1.2.3.4:deny\n", 0, b"", _keys(b"1.2.3.4", data=b"D\x00")),
    "range-top-over-255": BadInput(b"1.2.3.254-300:allow\n", 0, b"", _keys(b"1.2.3.254", b"1.2.3.255")),
    "range-reversed": BadInput(b"1.2.3.5-3:allow\n1.2.3.300-400:allow\n", 0, b"", []),
    "range-wraps-at-2-64": BadInput(b"1.2.3.0-18446744073709551617:allow\n", 0, b"", _keys(b"1.2.3.0", b"1.2.3.1")),
    "range-4400-digits": BadInput(
        b"1.2.3.1-1" + b"0" * 4400 + b"3:allow\n", 0, b"", _keys(b"1.2.3.1", b"1.2.3.2", b"1.2.3.3")
    ),
    "range-double-dash": BadInput(b"1.2.3.4--5:allow\n", 100, PARSE + b"1.2.3.4--5:allow\n"),
    "range-letters": BadInput(b"1.2.3.x-3:allow\n", 100, PARSE + b"1.2.3.x-3:allow\n"),
    "instruction-case": BadInput(b"1.2.3.4:Allow\n", 100, PARSE + b"1.2.3.4:Allow\n"),
    "unterminated-value": BadInput(b'1.2.3.4:allow,X="abc\n', 100, PARSE + b'1.2.3.4:allow,X="abc\n'),
}


def _records(path: Path) -> list[tuple[bytes, bytes]]:
    reader = cdbx.CDB(os.fspath(path))
    try:
        return list(reader.items(all=True))
    finally:
        reader.close()


@pytest.mark.parametrize("commands", BOTH)
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input(commands: Commands, name: str, workdir: Path) -> None:
    case = BAD_INPUTS[name]
    cdb = existing_cdb(workdir / "rules.cdb")
    (workdir / "rules.txt").write_bytes(case.stdin)
    result = run(commands.tcprules, "rules.cdb", "rules.tmp", cwd=workdir, stdin=workdir / "rules.txt")
    assert (result.exit_code, result.stdout) == (case.exit_code, b"")
    assert result.stderr == case.stderr  # no assert rewrite of a 1 MB message: compare plainly
    if case.records is None:
        cdb.assert_untouched()
        assert (workdir / "rules.tmp").exists()  # left behind, as the original leaves it
    else:
        assert _records(workdir / "rules.cdb") == case.records
        assert not (workdir / "rules.tmp").exists()


@pytest.mark.parametrize("commands", BOTH)
def test_stdin_closed(commands: Commands, workdir: Path) -> None:
    # TMP is opened first and gets descriptor 0: the read then fails on a write-only descriptor.
    cdb = existing_cdb(workdir / "rules.cdb")
    finished = subprocess.run(
        [commands.tcprules, "rules.cdb", "rules.tmp"],
        stdin=subprocess.DEVNULL,
        cwd=workdir,
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        preexec_fn=lambda: os.close(0),
    )
    assert (finished.returncode, finished.stderr) == (
        111,
        b"tcprules: fatal: unable to read input: file descriptor not open\n",
    )
    cdb.assert_untouched()


@needs_root
@pytest.mark.parametrize("commands", BOTH)
def test_existing_tmp_not_writable(commands: Commands, workdir: Path) -> None:
    workdir.chmod(0o777)
    (workdir / "rules.tmp").write_bytes(b"someone else's")
    cdb = existing_cdb(workdir / "rules.cdb")
    result = run(commands.tcprules, "rules.cdb", "rules.tmp", cwd=workdir, stdin=workdir / "rules.cdb", as_nobody=True)
    assert result == Result(111, b"", b"tcprules: fatal: unable to create rules.tmp: access denied\n")
    cdb.assert_untouched()
    assert (workdir / "rules.tmp").read_bytes() == b"someone else's"


def _big_rules(path: Path) -> Path:
    """About 250 kB of rules: more than the small filesystems and limits below hold."""
    path.write_bytes(
        b"".join(b'10.%d.%d.%d:allow,RELAYCLIENT=""\n' % (i >> 16, (i >> 8) & 255, i & 255) for i in range(8000))
    )
    return path


# In a private mount namespace (unshare -m), so the tmpfs is nobody else's and vanishes with it.
_FULL_DISK = r"""
mount -t tmpfs -o size=64k tmpfs "$1" || exit 99
cp "$2" "$1/rules.cdb" && cd "$1" || exit 98
stat -c %i rules.cdb > "$3/inode.before"
"$4" rules.cdb rules.tmp < "$5" 2> "$3/stderr"
echo $? > "$3/exit"
stat -c %i rules.cdb > "$3/inode.after"
cmp -s "$2" rules.cdb; echo $? > "$3/differs"
ls > "$3/files"
"""


@pytest.mark.parametrize("commands", BOTH)
def test_full_disk(commands: Commands, workdir: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): a full disk is covered by RLIMIT_FSIZE below")
    (workdir / "full").mkdir()
    (workdir / "out").mkdir()
    old = workdir / "old.cdb"
    existing_cdb(old)
    finished = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            _FULL_DISK,
            "sh",
            workdir / "full",
            old,
            workdir / "out",
            commands.tcprules,
            _big_rules(workdir / "big.rules"),
        ],
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        check=False,
    )
    if finished.returncode != 0:
        pytest.skip(f"no private mount namespace with a tmpfs here: {finished.stderr!r}")
    out = workdir / "out"
    assert (out / "exit").read_text() == "111\n"
    assert (out / "stderr").read_bytes() == b"tcprules: fatal: unable to write to rules.tmp: out of disk space\n"
    assert (out / "differs").read_text() == "0\n"  # the old cdb's bytes
    assert (out / "inode.before").read_text() == (out / "inode.after").read_text()
    assert (out / "files").read_text() == "rules.cdb\nrules.tmp\n"


@pytest.mark.parametrize("commands", BOTH)
def test_file_size_limit(commands: Commands, workdir: Path) -> None:
    cdb = existing_cdb(workdir / "rules.cdb")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    with open(_big_rules(workdir / "big.rules"), "rb") as rules:
        finished = subprocess.run(
            [commands.tcprules, "rules.cdb", "rules.tmp"],
            stdin=rules,
            cwd=workdir,
            capture_output=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            preexec_fn=limit,
            check=False,
        )
    if commands is OURS:
        assert (finished.returncode, finished.stderr) == (
            111,
            b"tcprules: fatal: unable to write to rules.tmp: file too big\n",
        )
    else:
        assert (finished.returncode, finished.stderr) == (-signal.SIGXFSZ, b"")  # README, differences item 7
    cdb.assert_untouched()


# --- readers: tcprulescheck and tcpserver -x -----------------------------------------------------


def _header_only(path: Path) -> None:
    """The 2048-byte table of contents of a real file, its records and hash tables gone."""
    existing_cdb(path)
    path.write_bytes(path.read_bytes()[:2048])


def _cut_before_end(path: Path) -> None:
    existing_cdb(path)
    path.write_bytes(path.read_bytes()[:-4])


def _cut_after_header(path: Path) -> None:
    existing_cdb(path)
    path.write_bytes(path.read_bytes()[:2060])


READER_PROBLEMS = {
    "header-only": _header_only,
    "ff-bytes": lambda path: path.write_bytes(b"\xff" * 4096),
    "truncated-tables": _cut_after_header,
}


@pytest.mark.parametrize("commands", BOTH)
@pytest.mark.parametrize("problem", list(READER_PROBLEMS))
def test_tcprulescheck_corrupt_or_truncated(commands: Commands, problem: str, workdir: Path) -> None:
    READER_PROBLEMS[problem](workdir / "rules.cdb")
    result = run(commands.tcprulescheck, "rules.cdb", cwd=workdir, env={"TCPREMOTEIP": "1.2.3.4"})
    assert result == Result(111, b"", b"tcprulescheck: fatal: unable to read rules.cdb: protocol error\n")


@pytest.mark.parametrize("commands", BOTH)
def test_tcprulescheck_truncated_answers_what_it_still_holds(commands: Commands, workdir: Path) -> None:
    # Cut 4 bytes before the end: the first of the two 1.2.3.4 records is still reachable.
    _cut_before_end(workdir / "rules.cdb")
    result = run(commands.tcprulescheck, "rules.cdb", cwd=workdir, env={"TCPREMOTEIP": "1.2.3.4"})
    assert result == Result(0, b"rule 1.2.3.4:\nset environment variable A=1\nallow connection\n", b"")


def _truncated_rules_for_the_client(path: Path) -> None:
    """Rules for 127.0.0.1 cut after the header: its lookup reads a hash table past the end."""
    rules_cdb(path.parent, "127.0.0.1:deny\n:deny\n", name=path.name)
    path.write_bytes(path.read_bytes()[:2060])


def _unreadable(path: Path) -> None:
    existing_cdb(path)
    path.chmod(0o600)  # root's: the server runs as nobody (-u, -g)


SERVER_PROBLEMS = {
    "unreadable": (_unreadable, b"access denied"),
    "corrupt": (lambda path: path.write_bytes(b"\xff" * 4096), b"protocol error"),
    "truncated": (_truncated_rules_for_the_client, b"protocol error"),
    "empty": (lambda path: path.write_bytes(b""), b"protocol error"),  # README, differences item 7
    "directory": (lambda path: path.mkdir(), b"is a directory"),  # README, differences item 7
}


@pytest.mark.parametrize("problem", list(SERVER_PROBLEMS))
def test_tcpserver_drops_the_client_and_recovers(problem: str, workdir: Path) -> None:
    if problem == "unreadable" and os.geteuid() != 0:
        pytest.skip("running the server as nobody needs root")
    make, error = SERVER_PROBLEMS[problem]
    cdb = workdir / "rules.cdb"
    make(cdb)
    before = Existing(cdb, cdb.read_bytes(), cdb.stat().st_ino) if cdb.is_file() else None
    options = ["-v", "-HRl0", "-x", "rules.cdb"]
    if problem == "unreadable":
        options += ["-u", str(NOBODY), "-g", str(NOBODY)]
    with start_server(OUR_SERVER.command, options, CAT_ENVIRON, cwd=workdir) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        assert talk_in_turn(server) == b""  # dropped: no program, no bytes
        server.wait_for_log(b"^tcpserver: warning: dropping connection, unable to read rules.cdb: " + error + b"$")
        if before is not None:
            before.assert_untouched()
        # Repaired (a fresh cdb renamed in), the next client is served by the same server.
        if cdb.is_dir():
            cdb.rmdir()
        rules_cdb(workdir, '127.0.0.1:allow,REPAIRED="yes"\n')
        cdb.chmod(0o644)
        assert b"REPAIRED=yes" in talk_in_turn(server)
        assert server.alive()
