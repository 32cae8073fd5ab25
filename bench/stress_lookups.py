"""Issue 9, rows 4-6 at full size: lookups when the server runs short of descriptors.

`ulimit -n 1024`, `tcpserver -c 2000`, 3,000 clients at once, from the address of an identd (rows
4 and 5) or of a DNS server (row 6) that answers each question after 1 s:
* row 4: -r, every program must see TCPREMOTEINFO=slowuser;
* row 5: -r with rules `slowuser@IP:allow` and `IP:deny`, every client must be allowed;
* row 6: -h (local and remote names looked up), every program must see TCPREMOTEHOST.
The original's lookups run in each child's own descriptor table; ours share the server's, so
they wait for a descriptor (ucspi/server/descriptors.py) while the accept loop holds back.

Prints, for each row and server (the original too when /usr/bin/tcpserver is installed): right
answers out of 3,000, the wall time, the clients' median and slowest times, and our server's
warnings. Exits 1 when ours gets one answer wrong or writes a warning. Every wait is bounded
(CLIENT_TIMEOUT per client, the whole run a few minutes at most).
Usage: .venv/bin/python bench/stress_lookups.py [--clients N] [--limit N] [--nofile N] [--delay S] [--rows 4,5,6]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import selectors
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(TOP / "tests" / "server"))

from fakes import FakeDNS, FakeIdentd, fresh_loopback  # noqa: E402
from serverproc import (  # noqa: E402
    ORIGINAL_SERVER,
    OUR_SERVER,
    Implementation,
    original_available,
    plain_environment,
    rules_cdb,
    start_server,
)
from serverstate import wait_idle, warnings  # noqa: E402

CLIENT_TIMEOUT = 60.0
IDENT_REPLY = b"1 , 2 : USERID : UNIX : slowuser\r\n"


@dataclass
class Outcome:
    replies: collections.Counter[bytes] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0


def clients_at_once(port: int, source: str, count: int, timeout: float = CLIENT_TIMEOUT) -> Outcome:
    """count clients from source, all connecting at once, each read to EOF (b"<timeout>" when slow)."""
    outcome = Outcome()
    began = time.monotonic()
    deadline = began + timeout
    selector = selectors.DefaultSelector()
    for _ in range(count):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        client.bind((source, 0))
        client.connect_ex(("127.0.0.1", port))
        selector.register(client, selectors.EVENT_READ, bytearray())
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(min(1.0, deadline - time.monotonic())):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            try:
                chunk = client.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""  # a reset ends the reply, as for read_to_eof
            if chunk:
                key.data.extend(chunk)
                continue
            selector.unregister(client)
            client.close()
            outcome.replies[bytes(key.data)] += 1
            outcome.latencies.append(time.monotonic() - began)
    for key in list(selector.get_map().values()):
        outcome.replies[b"<timeout>"] += 1
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()
    outcome.wall = time.monotonic() - began
    return outcome


def run_row(
    row: int, implementation: Implementation, args: argparse.Namespace, work: Path
) -> tuple[Outcome, bytes, list[bytes]]:
    """One row against one server: (outcome, the right reply, the server's warnings)."""
    ip = fresh_loopback()
    common = ["-c", str(args.limit), "-b", str(min(args.clients, 4096))]
    environment = plain_environment({b"DNSCACHEIP": ip.encode()})
    if row == 6:
        fake: FakeDNS | FakeIdentd = FakeDNS(
            ip, ptr={ip: "client.example.com.", "127.0.0.1": "local.example.com."}, delay=args.delay
        )
        options, program, right = ["-h", "-R", *common], ["/usr/bin/printenv", "TCPREMOTEHOST"], b"client.example.com\n"
    else:
        fake = FakeIdentd(ip, reply=IDENT_REPLY, delay=args.delay)
        options = ["-H", "-l", "localhost", "-r", *common]
        if row == 4:
            program, right = ["/usr/bin/printenv", "TCPREMOTEINFO"], b"slowuser\n"
        else:
            rules = rules_cdb(work, f"slowuser@{ip}:allow\n{ip}:deny\n", name=f"rules-{implementation.name}.cdb")
            options += ["-x", str(rules)]
            program, right = ["/bin/echo", "allowed"], b"allowed\n"
    with fake, start_server(implementation.command, ["-v", *options], program, environment=environment) as server:
        _, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (args.nofile, hard))
        outcome = clients_at_once(server.port, ip, args.clients)
        wait_idle(server, args.limit, timeout=CLIENT_TIMEOUT)
        found = warnings(server)
    if fake.errors:
        found.append(b"fake: " + repr(fake.errors[:3]).encode())
    return outcome, right, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3000)
    parser.add_argument("--limit", type=int, default=2000, help="tcpserver -c")
    parser.add_argument("--nofile", type=int, default=1024, help="the server's RLIMIT_NOFILE")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds before identd or DNS answers")
    parser.add_argument("--rows", default="4,5,6")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # This process holds every client and the fakes' side of every ident connection.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 3 * args.clients + 512)), hard))
    implementations = [OUR_SERVER, *([ORIGINAL_SERVER] if original_available() else [])]
    failed = False
    print(f"{args.clients} clients, -c {args.limit}, RLIMIT_NOFILE {args.nofile}, answers after {args.delay} s")
    with tempfile.TemporaryDirectory(prefix="stress-lookups-") as work:
        for row in (int(number) for number in args.rows.split(",")):
            for implementation in implementations:
                outcome, right, found = run_row(row, implementation, args, Path(work))
                got = outcome.replies[right]
                latencies = sorted(outcome.latencies) or [0.0]
                others = {reply[:40]: number for reply, number in outcome.replies.items() if reply != right}
                print(
                    f"row {row} {implementation.name:8} right {got}/{args.clients}  wall {outcome.wall:.2f} s  "
                    f"p50 {latencies[len(latencies) // 2]:.2f} s  max {latencies[-1]:.2f} s"
                    + (f"  others {others}" if others else "")
                    + (f"  warnings {found[:3]}" if found else "")
                )
                if implementation is OUR_SERVER and (got != args.clients or found):
                    failed = True
    print("FAILED" if failed else "ok: every client of ours got its answer")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
