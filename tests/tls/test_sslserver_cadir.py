"""CADIR is read during the handshake (OpenSSL opens HASH.0 for the issuer a client's certificate
names, and any client can name any issuer): that step runs off the loop's thread, and within -T.

A FIFO there (or a file on a hung mount) held the loop itself: every other client, established
sessions too, waited for it forever. Now one handshake thread waits, and the client that asked
is cut at its -T deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from tls.certs import Certificates
from tls.tlsclient import children_of, start_sslserver

HOSTILE = 9  # one more than the handshake pool's most threads


def _context(certificate: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(certificate, key)
    return context


def test_a_fifo_in_cadir_holds_neither_the_loop_nor_the_slot(tls_certs: Certificates, tmp_path: Path) -> None:
    cadir = tmp_path / "cadir"
    cadir.mkdir()
    issuer_hash = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", tls_certs.untrusted_ca],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.strip()
    fifo = cadir / f"{issuer_hash}.0"
    os.mkfifo(fifo)
    environment = {**tls_certs.environment(), b"CADIR": os.fsencode(cadir), b"CAFILE": os.fsencode(tls_certs.ca)}
    server = start_sslserver(["-m", "-T", "2", "-v"], ["echo", "hi"], environment)
    (serving,) = children_of(server.process.pid)
    hostile = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        # The hostile client's certificate names the issuer whose file is the FIFO.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        hostile_tls = _context(tls_certs.untrusted_client_cert, tls_certs.untrusted_client_key).wrap_bio(
            incoming, outgoing
        )
        started = time.monotonic()
        _drive_handshake(hostile, hostile_tls, incoming, outgoing, 1.0)  # its certificate sent: CADIR is read
        context = _context(tls_certs.client_cert, tls_certs.client_key)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, context.wrap_socket(raw) as good:
            assert good.recv(10) == b"hi\n"
            assert time.monotonic() - started < 2, "the other client waited for the FIFO"
        # -T ends the hostile one: EOF (or a reset) on its socket, not a wait for ever.
        hostile.settimeout(5)
        try:
            while hostile.recv(4096):
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 4.5
    finally:
        hostile.close()
        # The handshake thread's open() returns once the FIFO has a writer.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        try:
            server.stop()
        finally:
            with contextlib.suppress(OSError):  # a serving child whose loop hung would outlive the test
                os.kill(serving, signal.SIGKILL)


def test_clients_held_by_a_fifo_in_cadir_leave_the_handshake_threads_to_the_others(
    tls_certs: Certificates, tmp_path: Path
) -> None:
    """More hostile clients than the pool has threads (8 at most) each hold a thread in the FIFO's
    open past their -T: the good client that comes after them gets its handshake all the same
    (the threads held were written off and a new pool took their place)."""
    cadir = tmp_path / "cadir"
    cadir.mkdir()
    fifo = cadir / f"{_subject_hash(tls_certs.untrusted_ca)}.0"
    os.mkfifo(fifo)
    environment = {**tls_certs.environment(), b"CADIR": os.fsencode(cadir), b"CAFILE": os.fsencode(tls_certs.ca)}
    server = start_sslserver(["-m", "-T", "1", "-v"], ["echo", "hi"], environment)
    (serving,) = children_of(server.process.pid)
    hostile_clients = []
    try:
        for _ in range(HOSTILE):
            hostile = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            hostile_clients.append(hostile)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            hostile_tls = _context(tls_certs.untrusted_client_cert, tls_certs.untrusted_client_key).wrap_bio(
                incoming, outgoing
            )
            _drive_handshake(hostile, hostile_tls, incoming, outgoing, 0.5)  # its certificate sent: CADIR is read
        server.wait_for_log(r"unable to accept SSL: timeout", count=HOSTILE, timeout=10)
        context = _context(tls_certs.client_cert, tls_certs.client_key)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, context.wrap_socket(raw) as good:
            assert good.recv(10) == b"hi\n"
    finally:
        for hostile in hostile_clients:
            hostile.close()
        for _ in range(HOSTILE):  # each held open() returns once the FIFO has a writer
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            time.sleep(0.01)
        try:
            server.stop()
        finally:
            with contextlib.suppress(OSError):
                os.kill(serving, signal.SIGKILL)


def _subject_hash(certificate: Path) -> str:
    command = ["openssl", "x509", "-hash", "-noout", "-in", certificate]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout.strip()


def _drive_handshake(
    sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, seconds: float
) -> None:
    """The client's side of the handshake for a while (its certificate goes out in its second flight)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            tls.do_handshake()
            sock.sendall(outgoing.read())  # the last flight: its certificate
            return
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        if data:
            sock.sendall(data)
        try:
            received = sock.recv(65536)
        except TimeoutError:
            continue
        if not received:
            return
        incoming.write(received)
