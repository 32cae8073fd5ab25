#!/usr/bin/env python3
"""Does a flood of TLS handshakes stall sslserver's loop for the clients it already serves? (issue 14)

    .venv/bin/python bench/tls_latency.py [--kind rsa|ec] [--load 8] [--samples 400] [--rounds 3]

One established TLS session with `cat` behind it is pinged (1 byte out, 1 byte back) SAMPLES
times, first alone, then while LOAD client threads (in another process) do full handshakes as
fast as they can: each sends its ClientHello, reads the server's whole first flight (the
certificate and its signature: the server's costly part) and resets, so no program is spawned
and only the handshake work loads the loop. Prints p50 and p99 of the ping round trip, alone
and under load, per round. The goal (issue 14): under 8 RSA handshakes the p99 rises by 2 ms at most.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))
from tls.certs import make_certificates  # noqa: E402

SSLSERVER = TOP / ".venv" / "bin" / "sslserver"


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _handshake_flood(port: int, threads: int, stop_at: float, counter: multiprocessing.Value) -> None:
    def one_thread() -> None:
        context = _client_context()
        while time.monotonic() < stop_at:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            # A short timeout: loopback here now and then loses a segment for 3 s (plain tcpserver
            # too); a flood thread that waited for it would stop loading the server.
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=0.3)
            except OSError:
                continue
            with sock:
                sock.sendall(outgoing.read())
                try:
                    while True:  # until the client could answer: the server's flight is all here
                        data = sock.recv(65536)
                        if not data:
                            break
                        incoming.write(data)
                        try:
                            obj.do_handshake()
                            break
                        except ssl.SSLWantReadError:
                            continue
                except (OSError, ssl.SSLError):
                    pass
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with counter.get_lock():
                counter.value += 1

    workers = [threading.Thread(target=one_thread, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(stop_at - time.monotonic() + 10)


def _pings(port: int, samples: int) -> list[float]:
    context = _client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            times = []
            for _ in range(samples):
                started = time.perf_counter()
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    raise RuntimeError("no echo")
                times.append((time.perf_counter() - started) * 1000)
                time.sleep(0.005)
            return times


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("rsa", "ec"), default="rsa")
    parser.add_argument("--load", type=int, default=8)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        certs = make_certificates(directory)
        cert, key = certs.server(arguments.kind)
        env = {"PATH": "/usr/bin:/bin", "CERTFILE": str(cert), "KEYFILE": str(key)}
        command = [SSLSERVER, "-1", "-q", "-HR", "-c", "100", "127.0.0.1", "0", "cat"]
        # The control: the same flood at another server, so the CPU is as busy but this loop is not.
        servers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE) for _ in range(2)]
        try:
            ports = []
            for server in servers:
                assert server.stdout is not None
                ports.append(int(server.stdout.readline()))
            port, other = ports
            print(f"sslserver, {arguments.kind} certificate, {arguments.load} handshake threads, p50/p99 in ms")
            for round_number in range(1, arguments.rounds + 1):
                alone = _pings(port, arguments.samples)
                results = {}
                for target_name, target in (("same server", port), ("other server", other)):
                    counter = multiprocessing.Value("i", 0)
                    duration = arguments.samples * 0.006 + 2
                    flood = multiprocessing.Process(
                        target=_handshake_flood, args=(target, arguments.load, time.monotonic() + duration, counter)
                    )
                    flood.start()
                    time.sleep(0.5)
                    started = time.monotonic()
                    loaded = _pings(port, arguments.samples)
                    elapsed = time.monotonic() - started
                    done = counter.value
                    flood.join(duration + 15)
                    results[target_name] = (loaded, done / (elapsed + 0.5))
                line = (
                    f"round {round_number}: alone p50 {statistics.median(alone):.3f} p99 {_percentile(alone, 0.99):.3f}"
                )
                for target_name, (loaded, rate) in results.items():
                    line += (
                        f"; flood at the {target_name} ({rate:.0f}/s): p50 {statistics.median(loaded):.3f}"
                        f" p99 {_percentile(loaded, 0.99):.3f}"
                    )
                print(line)
        finally:
            for server in servers:
                server.terminate()
                server.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
