"""The launchers in bin/: before `make` they say so; after it they hand everything on unchanged."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import OUR_BIN, TOP, run_command

sys.path.insert(0, str(TOP / "tests" / "server"))
from serverproc import start_server, talk

from ucspi.cli import COMMANDS

LAUNCHED = sorted(COMMANDS)


@pytest.fixture
def checkout_before_make(tmp_path: Path) -> Path:
    """bin/ as a fresh clone has it: no .venv beside it."""
    shutil.copytree(OUR_BIN, tmp_path / "bin", symlinks=True)
    return tmp_path / "bin"


@pytest.mark.parametrize("command", LAUNCHED)
@pytest.mark.parametrize("arguments", [[], ["rules.cdb", "rules.tmp"], ["--version"]])
def test_before_make_the_launcher_says_run_make_first(
    command: str, arguments: list[str], checkout_before_make: Path
) -> None:
    result = run_command([checkout_before_make / command, *arguments], cwd=checkout_before_make)
    assert (result.returncode, result.stdout, result.stderr) == (
        111,
        b"",
        f"{command}: fatal: run make first\n".encode(),
    )


@pytest.mark.parametrize("command", ["tcprules", "tcprulescheck"])
def test_the_launcher_follows_a_symlink(command: str, tmp_path: Path) -> None:
    """As `make install` links PREFIX/bin/NAME to the virtualenv's launcher."""
    (tmp_path / command).symlink_to(OUR_BIN / command)
    result = run_command([tmp_path / command, "--version"])
    assert result.returncode == 0 and result.stdout.startswith(f"{command} (ucspi) ".encode())


# Out of order, a name twice, an entry without `=`, bytes that are no UTF-8, no PATH, LC_ALL=C
# (where Python would add LC_CTYPE), PWD wrong: all of it reaches the program as given.
ODD_ENVIRONMENT = [b"ZED=1", b"ALPHA=2", b"ZED=3", b"NO_EQUALS_SIGN", b"HIGH=\xff\xfe", b"LC_ALL=C", b"PWD=/nowhere"]


@pytest.mark.parametrize(
    "environment",
    [ODD_ENVIRONMENT, [b"B=2", b"A=1", b"LANG=C"], []],
    ids=["odd", "plain", "empty"],
)
def test_bin_tcpserver_hands_the_environment_on_exactly(environment: list[bytes], tmp_path: Path) -> None:
    with start_server(
        OUR_BIN / "tcpserver", ["-HR", "-l0"], ["/bin/cat", "/proc/self/environ"], environment=environment, cwd=tmp_path
    ) as server:
        entries = talk(server.port).split(b"\0")[:-1]
    added = [entry.partition(b"=")[0] for entry in entries[len(environment) :]]
    assert entries[: len(environment)] == environment
    assert added == [b"PROTO", b"TCPLOCALIP", b"TCPLOCALPORT", b"TCPLOCALHOST", b"TCPREMOTEIP", b"TCPREMOTEPORT"]


def test_bin_tcpserver_keeps_its_arguments_and_name() -> None:
    result = run_command([OUR_BIN / "tcpserver", "-c", "x"], environment={})
    assert result.returncode == 100
    assert result.stderr.startswith(b"tcpserver: usage: tcpserver [ -461UXpPhHrRoOdDqQv ]")
    assert os.access(OUR_BIN / "tcpserver", os.X_OK)
