"""A fork that fails (clone's EAGAIN under RLIMIT_NPROC): the original's `unable to fork` line, no
`pid` or `ok` line, the slot given back, as the original's parent does.

RLIMIT_NPROC counts every task of the user, and binds only once the server has dropped root:
each server runs as nobody with its hard limit set to nobody's tasks plus the server's own
threads, so its first clone for a client is the one refused.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from conftest import needs_tool
from serverproc import FALLBACK_FORCED, ORIGINAL, OUR_SERVER, original_available, plain_environment, start_server

NOBODY = 65534
OPTIONS = ["-v", "-HRl0", "-u", str(NOBODY), "-g", str(NOBODY)]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the server as nobody"),
    needs_tool("prlimit", "util-linux"),
    pytest.mark.skipif(FALLBACK_FORCED, reason="posix_spawn cannot tell a failed fork from a failed exec"),
]


def _tasks_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                count += len(os.listdir(f"/proc/{entry}/task"))
        except OSError:
            continue  # gone meanwhile
    return count


def _server_threads(command: Path) -> int:
    with start_server(command, OPTIONS, ["/bin/echo", "hi"], environment=plain_environment()) as server:
        server.wait_for_log(b"status: 0/40")
        return len(os.listdir(f"/proc/{server.pid}/task"))


def _refused_fork_log(command: Path) -> list[bytes]:
    limit = _tasks_of(NOBODY) + _server_threads(command)
    wrapper = ["prlimit", f"--nproc={limit}:{limit}"]
    program = ["/bin/echo", "hi"]
    with start_server(command, OPTIONS, program, environment=plain_environment(), wrapper=wrapper) as server:
        server.wait_for_log(b"status: 0/40")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
            assert client.recv(100) == b""  # no program: closed at once
        server.wait_for_log(b"status: 0/40", count=2)
        return [line for line in server.log() if not line.startswith(b"tcpserver: status")]


def test_a_failed_fork_is_told_as_the_original_tells_it() -> None:
    ours = _refused_fork_log(OUR_SERVER.command)
    assert ours == [b"tcpserver: warning: dropping connection, unable to fork: temporary failure"]
    if original_available():
        assert ours == _refused_fork_log(ORIGINAL)
