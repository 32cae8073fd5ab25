"""Every reference in the tree resolves inside it: a clone holds no ../shared/spec."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import TOP

BEHAVIOUR = TOP / "docs" / "behaviour.md"
README = TOP / "README.md"
# Documents that are not in the repository: the project's shared specs.
OUTSIDE = re.compile(r"\bspec \d|differences\.md|python-notes|next-features|field\.md|tls\.md|shared/spec")
SECTION = re.compile(r"docs/behaviour\.md §(\d+(?:\.\d+)*)")
DIFFERENCE = re.compile(r"README, differences items? (\d+)")


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "-C", str(TOP), "ls-files"], capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of the repository's files")
    return [
        TOP / name
        for name in listed.stdout.splitlines()
        if not name.startswith("tests/data/") and name != "tests/install/test_references.py" and (TOP / name).is_file()
    ]


def behaviour_sections() -> set[str]:
    text = BEHAVIOUR.read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", text, re.MULTILINE)) | set(
        re.findall(r"\*\*(\d+\.\d+)\*\*", text)
    )


def readme_differences() -> set[str]:
    section = README.read_text().split("## Differences from ucspi-tcp 0.88", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^(\d+)\. \*\*", section, re.MULTILINE))


def references(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    found = []
    for path in tracked_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [(str(path.relative_to(TOP)), match) for match in pattern.findall(text)]
    return found


def test_no_reference_to_a_document_outside_the_repository() -> None:
    outside = [
        f"{path.relative_to(TOP)}:{number}: {line.strip()}"
        for path in tracked_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert outside == []


def test_every_behaviour_section_cited_exists() -> None:
    sections = behaviour_sections()
    assert {"1.1", "3.2", "6.6", "9.4"} <= sections
    assert [(path, section) for path, section in references(SECTION) if section not in sections] == []


def test_every_difference_cited_is_in_the_readme() -> None:
    items = readme_differences()
    assert {"1", "4", "14"} <= items
    assert [(path, item) for path, item in references(DIFFERENCE) if item not in items] == []
