"""-c far above the descriptor limit: the server holds no descriptor per running program (docs/behaviour.md §6.5)."""

from __future__ import annotations

import re
import resource
from pathlib import Path

from serverproc import OUR_SERVER, connect, read_to_eof, start_server

LIMIT = 1000
DESCRIPTORS = 1024


def test_a_thousand_programs_at_once_under_1024_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The test itself holds LIMIT client sockets.
    wanted = LIMIT + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    server = start_server(OUR_SERVER.command, ["-v", "-H", "-R", "-l0", "-c", str(LIMIT), "-b", "1024"], ["sleep", "3"])
    clients = []
    try:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))
        clients = [connect(server.port, timeout=20) for _ in range(LIMIT)]
        # Every client is being served at the same time: the limit is reached, not the fd limit.
        server.wait_for_log(rf"^tcpserver: status: {LIMIT}/{LIMIT}$", timeout=30)
        assert len(list(Path(f"/proc/{server.pid}/fd").iterdir())) < 64
        for client in clients:
            assert read_to_eof(client, timeout=30) == b""
        server.wait_for_log(r"^tcpserver: end \d+ status 0$", count=LIMIT, timeout=30)
        server.wait_for_log(rf"^tcpserver: status: 0/{LIMIT}$", timeout=10)
        # Each program started is told ended once, with status 0: no end line lost, doubled
        # or given to a pid the server never started.
        log = server.log()
        started = [match[1] for line in log if (match := re.match(rb"^tcpserver: pid (\d+) from ", line))]
        ended = [match[1] for line in log if (match := re.match(rb"^tcpserver: end (\d+) status ", line))]
        assert len(set(started)) == len(started) == LIMIT
        assert sorted(ended) == sorted(started)
        assert all(line.endswith(b" status 0") for line in log if line.startswith(b"tcpserver: end "))
        assert not [line for line in server.log() if b"warning" in line]
        assert server.alive()
    finally:
        for client in clients:
            client.close()
        server.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
