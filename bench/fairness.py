"""Fairness under attack, and the cost of the per-address bookkeeping (issue 11's benchmark).

One address (127.0.0.2) opens up to 2,000 connections/s for 10 s (bench/attacker.c, 4 threads);
its rule makes each program hold its slot 10 s. Meanwhile 20 other addresses loop connect and
read-to-EOF (5 s timeout). `-c 100 -b 256`, against the C tcpserver and ours without limits
(0.88's behaviour), and ours with `-C 5`. For each: the others' success rate, p50 and p99 in a
phase without the attack and in the attack, and the ratio of the two p99s.

Then, in-process: one decision plus its release (Limits.decide, Ticket.give_back) with 100 and
with 10,000 live entries; the two costs should be within 1.5x of each other.

Usage: .venv/bin/python bench/fairness.py [--output FILE]   (about 1.5 min)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(TOP))
sys.path.insert(0, os.fspath(TOP / "tests" / "server"))

from serverproc import ORIGINAL_SERVER, OUR_SERVER, original_available, rules_cdb, start_server  # noqa: E402

from ucspi.server.limits import LimitOption, Limits  # noqa: E402

PROGRAM = ["/bin/sh", "-c", '[ -n "$HOLD" ] && sleep "$HOLD"; echo ok']
OTHERS = [f"127.0.0.{n}" for n in range(10, 30)]
ATTACKER = "127.0.0.2"
CALM_SECONDS = 5.0
ATTACK_SECONDS = 10.0


@dataclass
class Phase:
    tried: int
    served: int
    p50_ms: float
    p99_ms: float

    @property
    def success(self) -> float:
        return self.served / self.tried if self.tried else 0.0


def _others(port: int, seconds: float) -> Phase:
    """20 clients, each from its own address, looping connect, read to EOF, for `seconds`."""
    latencies: list[float] = []
    tried = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def loop(source: str) -> None:
        while time.monotonic() < stop_at:
            began = time.monotonic()
            ok = False
            try:
                with socket.socket() as client:
                    client.settimeout(5)
                    client.bind((source, 0))
                    client.connect(("127.0.0.1", port))
                    data = b""
                    while chunk := client.recv(100):
                        data += chunk
                    ok = data == b"ok\n"
            except OSError:
                pass
            with lock:
                tried[0] += 1
                if ok:
                    latencies.append(time.monotonic() - began)

    threads = [threading.Thread(target=loop, args=(source,)) for source in OTHERS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 10)
    latencies.sort()
    if not latencies:
        return Phase(tried[0], 0, float("nan"), float("nan"))
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return Phase(tried[0], len(latencies), statistics.median(latencies) * 1000, p99 * 1000)


def _run(command: Path, extra: list[str], cdb: Path, attacker: Path) -> tuple[Phase, Phase, str]:
    options = ["-HRl0", "-c", "100", "-b", "256", "-x", str(cdb), *extra]
    with start_server(command, options, PROGRAM, host="127.0.0.1") as server:
        calm = _others(server.port, CALM_SECONDS)
        attack = subprocess.Popen(
            [attacker, ATTACKER, "127.0.0.1", str(server.port), "4", "2000", str(ATTACK_SECONDS)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        under_attack = _others(server.port, ATTACK_SECONDS)
        attack_out, _ = attack.communicate(timeout=30)
    return calm, under_attack, attack_out.strip()


def _bookkeeping(live: int, decisions: int = 20000) -> float:
    """Microseconds for one decision and its release with `live` other connections counted."""
    limits = Limits(LimitOption(1_000_000), LimitOption(1_000_000), {})
    held = []
    for number in range(live):  # live entries spread over addresses and networks
        address = f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}".encode()
        held.append(limits.decide(address, [])[0])
    probe = b"192.0.2.77"

    def one() -> None:
        ticket, _, _ = limits.decide(probe, [])
        assert ticket is not None
        ticket.give_back()

    return min(timeit.repeat(one, number=decisions, repeat=5)) / decisions * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=TOP / "bench" / "results" / "fairness.md")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ucspi-fairness-") as directory:
        work = Path(directory)
        attacker = work / "attacker"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", attacker, TOP / "bench" / "attacker.c"], check=True)
        cdb = rules_cdb(work, f'{ATTACKER}:allow,HOLD="10"\n:allow\n')
        contestants = []
        if original_available():
            contestants.append(("C tcpserver, no limits", ORIGINAL_SERVER.command, []))
        contestants += [("ours, no limits", OUR_SERVER.command, []), ("ours, -C 5", OUR_SERVER.command, ["-C", "5"])]
        lines = [
            "| server | calm: served, p50 / p99 ms | attack: served, p50 / p99 ms | p99 attack / calm | attacker |",
            "|---|---|---|---|---|",
        ]
        for name, command, extra in contestants:
            calm, attack, attacker_said = _run(command, extra, cdb, attacker)
            ratio = attack.p99_ms / calm.p99_ms if calm.served and attack.served else float("nan")
            lines.append(
                f"| {name} | {calm.success:.1%} of {calm.tried}, {calm.p50_ms:.1f} / {calm.p99_ms:.1f} "
                f"| {attack.success:.1%} of {attack.tried}, {attack.p50_ms:.1f} / {attack.p99_ms:.1f} "
                f"| {ratio:.2f} | {attacker_said} |"
            )
            print(lines[-1], flush=True)
    cost_100, cost_10000 = _bookkeeping(100), _bookkeeping(10_000)
    lines += [
        "",
        "| live entries | one decision + release |",
        "|---|---|",
        f"| 100 | {cost_100:.2f} us |",
        f"| 10,000 | {cost_10000:.2f} us |",
        f"| ratio | {cost_10000 / cost_100:.2f} (goal <= 1.5) |",
    ]
    report = "\n".join(lines) + "\n"
    print("\n".join(lines[-6:]))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(
        "# Fairness under attack (bench/fairness.py)\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; -c 100 -b 256, the attacker 127.0.0.2 at"
        " up to 2,000 connections/s for 10 s, each of its programs holding 10 s; 20 other addresses"
        " loop connect and read to EOF (5 s timeout).\n\n" + report
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
