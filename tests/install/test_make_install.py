"""`make install PREFIX=...` and `make uninstall`, into a temporary prefix only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NOBODY, SYSTEM_PYTHON, TOP

from ucspi.cli import COMMANDS


def make(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(TOP), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture
def prefix() -> Iterator[Path]:
    """Under /tmp itself: pytest's tmp_path sits in a 0700 directory, where nobody cannot reach."""
    scratch = Path(tempfile.mkdtemp(prefix="ucspi-install-", dir="/tmp"))
    scratch.chmod(0o755)
    yield scratch / "prefix"
    shutil.rmtree(scratch)


def test_install_leaves_a_command_that_is_not_ours(prefix: Path) -> None:
    (prefix / "bin").mkdir(parents=True)
    theirs = prefix / "bin" / "tcpserver"
    theirs.write_text("#!/bin/sh\necho the original\n")
    result = make("install", f"PREFIX={prefix}")
    assert result.returncode != 0
    assert f"make install: {theirs} exists and is not ours; FORCE=1 replaces it" in result.stderr
    assert theirs.read_text() == "#!/bin/sh\necho the original\n"
    assert not (prefix / "lib").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON} to install with")
def test_install_then_uninstall(prefix: Path) -> None:
    installed = make("install", f"PREFIX={prefix}", f"PYTHON={SYSTEM_PYTHON}")
    assert installed.returncode == 0, installed.stderr
    assert "make install: warning" not in installed.stderr
    # Again over the first: our own links are no conflict.
    again = make("install", f"PREFIX={prefix}", f"PYTHON={SYSTEM_PYTHON}")
    assert again.returncode == 0, again.stderr
    library = prefix / "lib" / "ucspi"
    for command in COMMANDS:
        link = prefix / "bin" / command
        assert os.readlink(link) == f"{library}/bin/{command}"
        version = subprocess.run([link, "--version"], capture_output=True, check=False)
        assert version.stdout.startswith(f"{command} (ucspi) ".encode())
        assert (prefix / "share" / "man" / "man1" / f"{command}.1").read_bytes() == (
            TOP / "man" / f"{command}.1"
        ).read_bytes()
    if os.geteuid() == 0:
        as_nobody = subprocess.run(
            [prefix / "bin" / "tcprulescheck", "--version"],
            capture_output=True,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            check=False,
        )
        assert (as_nobody.returncode, as_nobody.stderr) == (0, b"")

    # Someone else's files beside ours stay.
    (prefix / "bin" / "recordio").write_text("#!/bin/sh\n")
    (prefix / "bin" / "other").symlink_to("/usr/bin/env")
    (prefix / "share" / "man" / "man1" / "recordio.1").write_text(".TH RECORDIO 1\n")
    uninstalled = make("uninstall", f"PREFIX={prefix}")
    assert uninstalled.returncode == 0, uninstalled.stderr
    assert sorted(path.name for path in (prefix / "bin").iterdir()) == ["other", "recordio"]
    assert [path.name for path in (prefix / "share" / "man" / "man1").iterdir()] == ["recordio.1"]
    assert not library.exists()


def _readable_by_others(path: str) -> bool:
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & 0o004:
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


@pytest.mark.skipif(
    _readable_by_others(sys._base_executable), reason="this virtualenv's Python is readable by everyone"
)
def test_install_warns_when_others_cannot_run_its_python(prefix: Path) -> None:
    """The virtualenv's own Python (a pyenv under /root here): installed, but only for its owner."""
    installed = make("install", f"PREFIX={prefix}", f"PYTHON={sys._base_executable}")
    assert installed.returncode == 0, installed.stderr
    assert "cannot be run by other users" in installed.stderr
    assert "PYTHON=/usr/bin/python3" in installed.stderr
    assert make("uninstall", f"PREFIX={prefix}").returncode == 0
