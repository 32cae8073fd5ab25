"""The man pages in man/: one per command, the same headings, tcpserver's options from its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOP, needs_tool

from ucspi.cli import COMMANDS
from ucspi.server.options import LONG_OPTIONS, OPTION_TABLE

MAN = TOP / "man"
PAGES = sorted(MAN.glob("*.1"))
HEADINGS = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "ENVIRONMENT",
    "EXIT CODES",
    "SIGNALS",
    "DIFFERENCES",
    "SEE ALSO",
]

sys.path.insert(0, str(MAN))
import generate  # noqa: E402  man/generate.py


def test_every_command_has_a_page() -> None:
    assert {page.stem for page in PAGES} >= set(COMMANDS)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_same_headings_in_every_page(page: Path) -> None:
    headings = [line[4:].strip('"') for line in page.read_text().splitlines() if line.startswith(".SH ")]
    assert headings == HEADINGS


@needs_tool("groff", "groff-base")
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_groff_renders_it_without_a_warning(page: Path) -> None:
    result = subprocess.run(["groff", "-man", "-ww", "-z", page], capture_output=True, check=False)
    assert (result.returncode, result.stderr) == (0, b"")


@needs_tool("man", "man-db")
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_man_shows_it(page: Path) -> None:
    result = subprocess.run(
        ["man", "--warnings", "-l", page],
        capture_output=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "MANPAGER": "cat", "LC_ALL": "C.UTF-8"},
    )
    assert (result.returncode, result.stderr) == (0, b"")
    assert re.search(rb"^NAME\n +" + page.stem.encode() + rb" - ", result.stdout, re.MULTILINE)


def test_the_generated_options_are_up_to_date() -> None:
    assert generate.main(["--check"]) == 0, "run .venv/bin/python man/generate.py"


@pytest.mark.parametrize("option", [*OPTION_TABLE, *LONG_OPTIONS], ids=lambda option: option.spelling)
def test_every_option_of_the_table_is_in_tcpserver_1(option: generate.Option) -> None:
    page = (MAN / "tcpserver.1").read_text()
    entry = "\n".join(generate.option_entry(option))
    assert entry in page
    assert generate.roff_text(option.spelling) in entry and generate.roff_text(option.help[1:]) in entry


def test_a_new_row_would_appear_in_the_page() -> None:
    """The generator is driven by the table itself, not a copy of it."""
    row = generate.Option("drain", "secs", "finish the programs, then stop", field="drain", parse=float)
    lines = generate.tcpserver_options(OPTION_TABLE, (*LONG_OPTIONS, row))
    assert '.BI "\\-\\-drain=" "secs"' in lines and "Finish the programs, then stop." in lines
