"""Connections per second through one HAProxy 2.6 (issue 12): ours reading send-proxy-v2 headers
(--proxy-from), ours without PROXY, and the C tcpserver without PROXY (it cannot read one), as
a reference row.

Each round starts every contestant in turn behind a fresh HAProxy (the order rotates), loads it
with bench/loadgen.c through HAProxy's frontend, and stops both. The figure that counts is the
median over rounds of (ours with PROXY / ours without): the goal is at least 0.90. Prints the
table; exits 0 (1 only when something did not run).

Usage: .venv/bin/python bench/proxy_bench.py [--rounds N] [--clients N] [--count N] [--seconds S]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import C_SERVER, OURS, LoadResult, build_loadgen, run_load, start_server, stop_server

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
GOAL = 0.90


@dataclass(frozen=True)
class Contestant:
    name: str
    server: str
    options: tuple[str, ...]
    send_proxy: str  # the HAProxy `server` line's PROXY option, or ""


CONTESTANTS = (
    Contestant("ours, send-proxy-v2", OURS, ("--proxy-from=127.0.0.1/32",), "send-proxy-v2"),
    Contestant("ours, no PROXY", OURS, (), ""),
    Contestant("C tcpserver, no PROXY", C_SERVER, (), ""),
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bound(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_haproxy(directory: Path, backend_port: int, send_proxy: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    config = directory / "haproxy.cfg"
    config.write_text(
        "global\n    nbthread 1\n    user nobody\n    group nogroup\n    maxconn 4096\n"
        "resolvers default\n    nameserver lo 127.0.0.1:53\n"  # keeps HAProxy 2.6 off the network
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n"
        f"backend be\n    server s1 127.0.0.1:{backend_port} {send_proxy}\n"
    )
    process = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not _bound(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"haproxy did not start: {process.stderr.read() if process.stderr else b''!r}")
        time.sleep(0.02)
    return process, port


def measure(loadgen: Path, directory: Path, contestant: Contestant, args: argparse.Namespace) -> LoadResult:
    server, server_port = start_server(contestant.server, contestant.options, ("/bin/true",))
    try:
        balancer, port = start_haproxy(directory, server_port, contestant.send_proxy)
        try:
            run_load(loadgen, port, args.clients, 50, 5)  # warm-up
            return run_load(loadgen, port, args.clients, args.count, args.seconds)
        finally:
            balancer.terminate()
            balancer.wait(10)
    finally:
        stop_server(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("at least 5 rounds")
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as scratch:
        directory = Path(scratch)
        loadgen = build_loadgen(directory)
        results: dict[str, list[LoadResult]] = {contestant.name: [] for contestant in CONTESTANTS}
        for round_number in range(args.rounds):
            shift = round_number % len(CONTESTANTS)
            for contestant in [*CONTESTANTS[shift:], *CONTESTANTS[:shift]]:
                results[contestant.name].append(measure(loadgen, directory, contestant, args))
    proxied, plain = results[CONTESTANTS[0].name], results[CONTESTANTS[1].name]
    ratios = [top.rate / bottom.rate for top, bottom in zip(proxied, plain, strict=True) if bottom.rate]
    print(f"through HAProxy 2.6, {args.clients} clients, {args.count} connections, {args.rounds} rounds")
    print()
    print("| server | conn/s (median) | p50 / p99 us | failed | rounds |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        rates = " ".join(f"{row.rate:.0f}" for row in rows)
        print(
            f"| {name} | {statistics.median(r.rate for r in rows):.0f} "
            f"| {statistics.median(r.p50_us for r in rows):.0f} / {statistics.median(r.p99_us for r in rows):.0f} "
            f"| {sum(r.failed for r in rows)} | {rates} |"
        )
    ratio = statistics.median(ratios) if ratios else 0.0
    verdict = "met" if ratio >= GOAL else "NOT met"
    print()
    print(f"ours with PROXY / ours without: {ratio:.2f} (per round: {' '.join(f'{r:.2f}' for r in ratios)});")
    print(f"goal >= {GOAL:.2f}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
