"""--version and --help for every command (README, differences item 4); elsewhere 0.88's reading."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
from conftest import OUR_BIN, TOP, original_command, run_command

from ucspi.cli import COMMANDS

VERSION = configparser.ConfigParser()
VERSION.read(TOP / "setup.cfg")
SETUP_VERSION = VERSION["metadata"]["version"]
RULES = b"1.2.3.4:deny\n:allow\n"


def ours(command: str) -> Path:
    # tcpserver through the virtualenv's entry point, as the server tests run it.
    return TOP / ".venv" / "bin" / command if command == "tcpserver" else OUR_BIN / command


@pytest.mark.parametrize("command", COMMANDS)
def test_version_is_setup_cfgs(command: str) -> None:
    result = run_command([ours(command), "--version"])
    # tcpserver names its spawn path too: `, spawn: clone extension` or `, spawn: posix_spawn (ctypes)`.
    spawn = rb"(, spawn: [a-z_ ()]+)?" if command == "tcpserver" else b""
    assert (result.returncode, result.stderr) == (0, b"")
    assert re.fullmatch(re.escape(f"{command} (ucspi) {SETUP_VERSION}".encode()) + spawn + b"\n", result.stdout)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_stdout(command: str) -> None:
    result = run_command([ours(command), "--help"])
    assert result.returncode == 0 and result.stderr == b""
    assert command.encode() in result.stdout.split(b"\n", 1)[0]


@pytest.mark.parametrize("implementation", ["ours", "original"])
def test_tcprules_takes_the_words_as_file_names_among_others(implementation: str, tmp_path: Path) -> None:
    command = OUR_BIN / "tcprules" if implementation == "ours" else original_command("tcprules")
    if command is None:
        pytest.skip("the original tcprules is not installed")
    result = run_command([command, "--help", "--version"], RULES, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["--help"]


@pytest.mark.parametrize("implementation", ["ours", "original"])
@pytest.mark.parametrize("arguments", [["--version", "x"], ["--help", "--help"]])
def test_tcprulescheck_takes_the_word_as_a_file_name_among_others(
    implementation: str, arguments: list[str], tmp_path: Path
) -> None:
    command = OUR_BIN / "tcprulescheck" if implementation == "ours" else original_command("tcprulescheck")
    if command is None:
        pytest.skip("the original tcprulescheck is not installed")
    result = run_command([command, *arguments], cwd=tmp_path)
    expected = f"tcprulescheck: fatal: unable to read {arguments[0]}: file does not exist\n".encode()
    assert (result.returncode, result.stdout, result.stderr) == (111, b"", expected)


@pytest.mark.parametrize("implementation", ["ours", "original"])
def test_tcprules_with_one_word_is_still_the_usage(implementation: str, tmp_path: Path) -> None:
    command = OUR_BIN / "tcprules" if implementation == "ours" else original_command("tcprules")
    if command is None:
        pytest.skip("the original tcprules is not installed")
    result = run_command([command, "-h"], RULES, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (100, b"tcprules: usage: tcprules rules.cdb rules.tmp\n")
