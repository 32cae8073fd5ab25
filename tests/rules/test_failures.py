"""Failures of tcprules and tcprulescheck that must lose nothing (docs/behaviour.md §3.1, 3.2, 4).

Every case runs against our commands and, where installed, against the original with the same
expectations. On each tcprules failure an existing CDB must keep its bytes and its inode, and
TMP must be left behind as the original leaves it. Cases needing an unprivileged user run the
program as `nobody`, which needs root to arrange; ours then from a copy nobody can reach
(conftest.command_for_nobody), since the checkout may sit in a directory only root can enter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import NOBODY, command_for_nobody

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden"
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

TCPRULES_USAGE = b"tcprules: usage: tcprules rules.cdb rules.tmp\n"
TCPRULESCHECK_USAGE = b"tcprulescheck: usage: tcprulescheck rules.cdb\n"


@dataclass(frozen=True)
class Commands:
    tcprules: Path
    tcprulescheck: Path


OURS = Commands(ROOT / "bin" / "tcprules", ROOT / "bin" / "tcprulescheck")
ORIGINAL = Commands(Path("/usr/bin/tcprules"), Path("/usr/bin/tcprulescheck"))
BOTH = [
    pytest.param(OURS, id="ours"),
    pytest.param(
        ORIGINAL,
        id="original",
        marks=pytest.mark.skipif(not ORIGINAL.tcprules.exists(), reason="the original ucspi-tcp is not installed"),
    ),
]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a command as nobody needs root")


@dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: bytes
    stderr: bytes


def run(
    program: Path,
    *args: str,
    cwd: Path,
    stdin: Path | int | None = None,
    env: dict[str, str] | None = None,
    as_nobody: bool = False,
) -> Result:
    """Run a command; stdin is a file to read, an open descriptor, or /dev/null."""
    identity = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if as_nobody else {}
    if as_nobody:
        # Ours from a copy nobody can reach when this checkout (or its Python) is root's alone.
        program = command_for_nobody(program)
    with open(os.devnull if stdin is None or isinstance(stdin, int) else stdin, "rb") as file:
        result = subprocess.run(
            [program, *args],
            stdin=stdin if isinstance(stdin, int) else file,
            cwd=cwd,
            capture_output=True,
            env=BASE_ENV | (env or {}),
            **identity,
        )
    return Result(result.returncode, result.stdout, result.stderr)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory nobody can enter (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="ucspi-failures-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@dataclass(frozen=True)
class Existing:
    """A file present before the run, and what it must still be afterwards."""

    path: Path
    content: bytes
    inode: int

    def assert_untouched(self) -> None:
        assert self.path.read_bytes() == self.content
        assert self.path.stat().st_ino == self.inode  # not replaced by an equal copy


def existing_cdb(path: Path) -> Existing:
    shutil.copyfile(GOLDEN / "ex7_duplicate_key.cdb", path)
    return Existing(path, path.read_bytes(), path.stat().st_ino)


# Input whose compiled form the original left in golden/: a TMP that failed only at the rename
# must hold exactly that.
RULES = GOLDEN / "ex1_deny.rules"
COMPILED = (GOLDEN / "ex1_deny.cdb").read_bytes()


# --- tcprules -------------------------------------------------------------------------------


@pytest.mark.parametrize("commands", BOTH)
@pytest.mark.parametrize("args", [(), ("rules.cdb",)], ids=["no-arguments", "cdb-only"])
def test_tcprules_usage(commands: Commands, args: tuple[str, ...], workdir: Path) -> None:
    result = run(commands.tcprules, *args, cwd=workdir, stdin=RULES)
    assert result == Result(100, b"", TCPRULES_USAGE)
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("commands", BOTH)
def test_tcprules_uncreatable_tmp(commands: Commands, workdir: Path) -> None:
    cdb = existing_cdb(workdir / "rules.cdb")
    result = run(commands.tcprules, "rules.cdb", "/dev/nonexistent/tmp", cwd=workdir, stdin=RULES)
    assert result == Result(111, b"", b"tcprules: fatal: unable to create /dev/nonexistent/tmp: file does not exist\n")
    cdb.assert_untouched()


@pytest.mark.parametrize("commands", BOTH)
def test_tcprules_cdb_is_a_directory(commands: Commands, workdir: Path) -> None:
    (workdir / "cdbdir").mkdir()
    inside = existing_cdb(workdir / "cdbdir" / "keep.cdb")
    result = run(commands.tcprules, "cdbdir", "rules.tmp", cwd=workdir, stdin=RULES)
    assert result == Result(111, b"", b"tcprules: fatal: unable to move rules.tmp to cdbdir: is a directory\n")
    inside.assert_untouched()
    assert sorted(path.name for path in (workdir / "cdbdir").iterdir()) == ["keep.cdb"]
    assert (workdir / "rules.tmp").read_bytes() == COMPILED


@pytest.mark.parametrize("commands", BOTH)
def test_tcprules_tmp_on_another_filesystem(commands: Commands, workdir: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == workdir.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than /tmp")
    tmp = shm / f"ucspi-test-{uuid.uuid4().hex}.tmp"
    cdb = existing_cdb(workdir / "rules.cdb")
    try:
        result = run(commands.tcprules, "rules.cdb", str(tmp), cwd=workdir, stdin=RULES)
        message = b"tcprules: fatal: unable to move %s to rules.cdb: cross-device link\n" % os.fsencode(tmp)
        assert result == Result(111, b"", message)
        cdb.assert_untouched()
        assert tmp.read_bytes() == COMPILED
    finally:
        tmp.unlink(missing_ok=True)


@pytest.mark.parametrize("commands", BOTH)
def test_tcprules_stdin_is_a_directory(commands: Commands, workdir: Path) -> None:
    cdb = existing_cdb(workdir / "rules.cdb")
    directory = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = run(commands.tcprules, "rules.cdb", "rules.tmp", cwd=workdir, stdin=directory)
    finally:
        os.close(directory)
    assert result == Result(111, b"", b"tcprules: fatal: unable to read input: is a directory\n")
    cdb.assert_untouched()
    assert (workdir / "rules.tmp").exists()


@pytest.mark.parametrize("commands", BOTH)
def test_tcprules_parse_error_after_good_lines(commands: Commands, workdir: Path) -> None:
    cdb = existing_cdb(workdir / "rules.cdb")
    rules = GOLDEN / "parse_error_after_good_lines.rules"
    result = run(commands.tcprules, "rules.cdb", "rules.tmp", cwd=workdir, stdin=rules)
    # The golden stderr is the original's, written with these same file names.
    expected = (GOLDEN / "parse_error_after_good_lines.stderr").read_bytes()
    assert expected.startswith(b"tcprules: fatal: unable to parse this line: ")
    assert result == Result(100, b"", expected)
    cdb.assert_untouched()
    assert (workdir / "rules.tmp").exists()


@needs_root
@pytest.mark.parametrize("commands", BOTH)
def test_tcprules_tmp_in_unwritable_directory(commands: Commands, workdir: Path) -> None:
    (workdir / "ro").mkdir(mode=0o755)
    cdb = existing_cdb(workdir / "rules.cdb")
    result = run(commands.tcprules, "rules.cdb", "ro/rules.tmp", cwd=workdir, stdin=RULES, as_nobody=True)
    assert result == Result(111, b"", b"tcprules: fatal: unable to create ro/rules.tmp: access denied\n")
    cdb.assert_untouched()
    assert list((workdir / "ro").iterdir()) == []


@needs_root
@pytest.mark.parametrize("commands", BOTH)
def test_tcprules_cdb_in_unwritable_directory(commands: Commands, workdir: Path) -> None:
    (workdir / "ro").mkdir(mode=0o755)
    (workdir / "rw").mkdir()
    (workdir / "rw").chmod(0o777)
    cdb = existing_cdb(workdir / "ro" / "rules.cdb")
    result = run(commands.tcprules, "ro/rules.cdb", "rw/rules.tmp", cwd=workdir, stdin=RULES, as_nobody=True)
    assert result == Result(111, b"", b"tcprules: fatal: unable to move rw/rules.tmp to ro/rules.cdb: access denied\n")
    cdb.assert_untouched()
    tmp = workdir / "rw" / "rules.tmp"
    assert tmp.read_bytes() == COMPILED
    assert tmp.stat().st_uid == NOBODY


# --- tcprulescheck --------------------------------------------------------------------------


@pytest.mark.parametrize("commands", BOTH)
def test_tcprulescheck_usage(commands: Commands, workdir: Path) -> None:
    assert run(commands.tcprulescheck, cwd=workdir) == Result(100, b"", TCPRULESCHECK_USAGE)


@pytest.mark.parametrize("commands", BOTH)
def test_tcprulescheck_missing_cdb(commands: Commands, workdir: Path) -> None:
    result = run(commands.tcprulescheck, "missing.cdb", cwd=workdir, env={"TCPREMOTEIP": "1.2.3.4"})
    assert result == Result(111, b"", b"tcprulescheck: fatal: unable to read missing.cdb: file does not exist\n")


@pytest.mark.parametrize("commands", BOTH)
def test_tcprulescheck_garbage_cdb(commands: Commands, workdir: Path) -> None:
    (workdir / "garbage.cdb").write_bytes(b"garbage!")  # 8 bytes: the header read runs off the end
    result = run(commands.tcprulescheck, "garbage.cdb", cwd=workdir, env={"TCPREMOTEIP": "1.2.3.4"})
    assert result == Result(111, b"", b"tcprulescheck: fatal: unable to read garbage.cdb: protocol error\n")


@needs_root
@pytest.mark.parametrize("commands", BOTH)
def test_tcprulescheck_unreadable_cdb(commands: Commands, workdir: Path) -> None:
    cdb = existing_cdb(workdir / "rules.cdb")
    cdb.path.chmod(0o600)
    result = run(commands.tcprulescheck, "rules.cdb", cwd=workdir, env={"TCPREMOTEIP": "1.2.3.4"}, as_nobody=True)
    assert result == Result(111, b"", b"tcprulescheck: fatal: unable to read rules.cdb: access denied\n")


# The original crashes or says `invalid argument` here; ours follows README, differences item 7.
@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda path: path.write_bytes(b""), b"protocol error"),
        (lambda path: path.mkdir(), b"is a directory"),
    ],
    ids=["empty-cdb", "directory"],
)
def test_our_tcprulescheck_on_empty_cdb_or_directory(
    make: Callable[[Path], object], error: bytes, workdir: Path
) -> None:
    make(workdir / "rules.cdb")
    result = run(OURS.tcprulescheck, "rules.cdb", cwd=workdir, env={"TCPREMOTEIP": "1.2.3.4"})
    assert result == Result(111, b"", b"tcprulescheck: fatal: unable to read rules.cdb: " + error + b"\n")
