"""The supervised parent's sd_notify relay (ucspi/tls/detach.py) hears its serving child only.

The relay is an abstract UNIX socket, which has no file permissions: any local user can send to
it. A STOPPING=1 from anyone else made the parent exit 0 while its child went on serving with
its listeners open (a supervisor's restart then failed to bind), and anything else was passed on
to systemd as the main pid's word.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

from tls.certs import Certificates
from tls.tlsclient import TlsClient, children_of, start_sslserver


def _abstract_addresses(pid: int) -> list[bytes]:
    """The abstract UNIX addresses pid's sockets are bound to (/proc/net/unix: what anyone can read)."""
    inodes = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(entry)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith("@"):
            found.append(b"\0" + fields[7][1:].encode())
    return found


def test_a_stranger_s_stopping_does_not_end_the_supervised_process(tls_certs: Certificates) -> None:
    server = start_sslserver([], ["echo", "hello"], tls_certs.environment())
    serving = 0
    try:
        supervised = server.process.pid
        (serving,) = children_of(supervised)
        assert _abstract_addresses(supervised), "no relay socket found"
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            for address in _abstract_addresses(supervised):
                stranger.sendto(b"STOPPING=1", address)
        finally:
            stranger.close()
        time.sleep(0.5)
        assert server.process.poll() is None, "the parent took a stranger's STOPPING=1"
        with TlsClient(server.port) as client:
            client.handshake()
            assert client.read_all().data == b"hello\n"
    finally:
        server.stop()
        if serving and server.process.poll() is not None:
            with contextlib.suppress(OSError):  # orphaned by the bug: still ours to end
                os.kill(serving, signal.SIGKILL)


def test_the_child_s_readiness_and_stopping_still_reach_systemd(tls_certs: Certificates, tmp_path: Path) -> None:
    """The check lets the serving child's own datagrams through, from the parent's pid."""
    address = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(os.fspath(address))
    receiver.settimeout(10)
    environment = {**tls_certs.environment(), b"NOTIFY_SOCKET": os.fsencode(address)}
    server = start_sslserver([], ["echo", "hello"], environment)
    try:
        assert b"READY=1" in receiver.recv(4096).split(b"\n")
        server.process.send_signal(signal.SIGTERM)
        messages = []
        deadline = time.monotonic() + 10
        while b"STOPPING=1" not in messages and time.monotonic() < deadline:
            messages += receiver.recv(4096).split(b"\n")
        assert b"STOPPING=1" in messages
        assert server.process.wait(10) == 0
    finally:
        receiver.close()
        if server.process.poll() is None:
            server.stop()
