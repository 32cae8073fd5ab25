"""Running a tcpclient (ours or Debian's) as a real process, and what its program saw.

The program behind the client is tests/client/show_program.py: it writes, as JSON on stdout,
its environment block, its open descriptors, what it read on fd 6, and then exits with the
code it was given. Test modules import this file as `clientproc` (tests/client on sys.path,
tests/server too for serverproc and fakes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TOP / "tests" / "server"))

from serverproc import launch  # noqa: E402

# The installed entry point names its interpreter itself: the program's environment is exactly
# what the test gave (bin/tcpclient reaches the same file through the checkout's launcher).
OURS = TOP / ".venv" / "bin" / "tcpclient"
ORIGINAL = Path("/usr/bin/tcpclient")
CLIENTS = {"ours": OURS, "original": ORIGINAL}
SHOW_PROGRAM = [sys.executable, "-S", str(TOP / "tests" / "client" / "show_program.py")]
RUN_TIMEOUT = 30.0


def original_available() -> bool:
    return os.access(ORIGINAL, os.X_OK)


def run_client(
    command: Path,
    arguments: Sequence[str | bytes],
    *,
    environment: Sequence[bytes] | None = None,
    pass_fds: Sequence[int] = (),
    ignore_signals: Sequence[int] = (),
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    """COMMAND ARGUMENTS with exactly these environment entries (default: PATH only)."""
    process = launch(command, arguments, environment=environment, pass_fds=pass_fds, ignore_signals=ignore_signals)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=5)
        raise
    return subprocess.CompletedProcess([command, *arguments], process.returncode, stdout, stderr)


def shown(result: subprocess.CompletedProcess[bytes]) -> dict:
    """What show_program.py reported (the last line of stdout)."""
    lines = result.stdout.strip().splitlines()
    assert lines, f"the program wrote nothing; stderr {result.stderr!r}, exit {result.returncode}"
    return json.loads(lines[-1])


_PORT_ENTRY = re.compile(r"^(TCPLOCALPORT|TCPREMOTEPORT)=\d+$")


def masked_environment(report: dict, remote_port: int) -> list[str]:
    """The entries, with the client's own (random) local port replaced by PORT; the server's stays."""
    entries = []
    for entry in report["environment"]:
        if _PORT_ENTRY.match(entry) and entry != f"TCPREMOTEPORT={remote_port}":
            entry = entry.split("=")[0] + "=PORT"
        entries.append(entry)
    return entries
