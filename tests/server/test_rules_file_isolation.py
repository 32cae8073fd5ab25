"""The rules file can never stall or crash the server (issue 9, rows 2, 3, 8 and 9).

A bad rules.cdb (a FIFO, a device, a socket, a directory, garbage) is put in place while the
server runs: each client is dropped at once with the original's words, the server keeps its
slots, serves the next client as soon as the good file is back, and stops on SIGTERM. Where the
original is installed it runs the same scenario and its outcome is the expectation. A 60 MB file
(garbage, or a valid cdb touched over and over) costs the loop only milliseconds.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from serverproc import (
    ORIGINAL_SERVER,
    OUR_SERVER,
    Implementation,
    ServerProcess,
    original_available,
    rules_cdb,
    start_server,
    talk,
)
from serverstate import in_threads, status_lines, wait_idle, warnings

from ucspi.rules.database import VERDICTS_KEPT, RulesFile

GOOD_RULES = '127.0.0.1:allow,RULES="good"\n:deny\n'
SERVED = b"served good\n"
PROGRAM = ["sh", "-c", 'echo served "$RULES"']
DROPPED = b""
# The rules come after DNS and ident, whose time limits would otherwise be all one measures.
NO_LOOKUPS = "-HRl0"
LIMIT = 1  # a slot leaked by one bad connection is then an outage for everyone
# Today's reader of /dev/zero grows until memory runs out: capped, it fails in seconds, not after
# eating the machine's memory (the server lifts its own soft limits, so the cap is set from here).
ADDRESS_SPACE_CAP = 3 << 30

# What each kind of file gets, for a drop line `unable to read DIR/rules.cdb: TEXT`. When the
# original is installed its line is checked against the same text.
WORDS = {
    "fifo": "invalid argument",
    "/dev/zero": "invalid argument",
    "/dev/urandom": "invalid argument",
    "/dev/null": "invalid argument",
    "socket": "device not configured",
    "garbage": "protocol error",
    "header only": "protocol error",
}
# Where the original crashes (differences item 7), our own words, compared with nothing.
OURS_ONLY = {
    "directory": "is a directory",  # the original's child segfaults
    "empty": "protocol error",  # the 64-bit original says `invalid argument`
}


def _put_bad_file(cdb: Path, kind: str, good: Path) -> None:
    """Replace cdb by a file of this kind, renamed in as tcprules would where a rename can."""
    new = cdb.with_name("bad.new")
    if kind == "directory":
        cdb.unlink()
        cdb.mkdir()
        return
    if kind == "fifo":
        os.mkfifo(new)
    elif kind.startswith("/dev/"):
        os.symlink(kind, new)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(os.fspath(new))
    elif kind == "garbage":
        new.write_bytes(os.urandom(100_000))
    elif kind == "header only":
        new.write_bytes(good.read_bytes()[:2048])
    elif kind == "empty":
        new.write_bytes(b"")
    else:
        raise AssertionError(kind)
    os.replace(new, cdb)


def _put_good_file(cdb: Path, good: Path) -> None:
    if cdb.is_dir() and not cdb.is_symlink():
        cdb.rmdir()
    new = cdb.with_name("good.new")
    shutil.copyfile(good, new)
    os.replace(new, cdb)


@dataclass
class BadFileOutcome:
    before: bytes
    during: list[bytes]
    drops: list[bytes]
    after: bytes
    after_seconds: float
    exit_code: int
    stop_seconds: float


def _talk_or_timeout(server: ServerProcess) -> bytes:
    try:
        return talk(server.port, timeout=5)
    except TimeoutError:
        return b"<no answer within 5 s>"


def bad_file_then_good(implementation: Implementation, directory: Path, kind: str) -> BadFileOutcome:
    """Served, then three clients against the bad file, then the good file back: served."""
    directory.mkdir()
    good = rules_cdb(directory, GOOD_RULES, "good.cdb")
    cdb = directory / "rules.cdb"
    shutil.copyfile(good, cdb)
    options = ["-v", NO_LOOKUPS, "-c", str(LIMIT), "-x", os.fspath(cdb)]
    with start_server(implementation.command, options, PROGRAM) as server:
        if implementation is OUR_SERVER:
            resource.prlimit(server.pid, resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))
        before = talk(server.port)
        wait_idle(server, LIMIT, timeout=5)
        _put_bad_file(cdb, kind, good)
        during = [_talk_or_timeout(server) for _ in range(3)]
        _put_good_file(cdb, good)
        started = time.monotonic()
        after = _talk_or_timeout(server)
        after_seconds = time.monotonic() - started
        if after == SERVED:
            wait_idle(server, LIMIT, timeout=5)
        drops = [line.replace(os.fsencode(directory), b"DIR") for line in warnings(server)]
        started = time.monotonic()
        try:
            exit_code = server.stop(timeout=3)
        except Exception:  # subprocess.TimeoutExpired: stop() killed it
            exit_code = -1
        stop_seconds = time.monotonic() - started
    return BadFileOutcome(before, during, drops, after, after_seconds, exit_code, stop_seconds)


def _drop_line(text: str) -> bytes:
    return b"tcpserver: warning: dropping connection, unable to read DIR/rules.cdb: " + text.encode()


@pytest.mark.parametrize("kind", [*WORDS, *OURS_ONLY])
def test_a_bad_rules_file_drops_each_client_then_the_good_file_serves_at_once(tmp_path: Path, kind: str) -> None:
    ours = bad_file_then_good(OUR_SERVER, tmp_path / "ours", kind)
    words = WORDS.get(kind) or OURS_ONLY[kind]
    if kind in WORDS and original_available():
        original = bad_file_then_good(ORIGINAL_SERVER, tmp_path / "original", kind)
        assert original.during == [DROPPED] * 3
        assert original.drops == [_drop_line(words)] * 3
        assert ours.during == original.during
        assert ours.drops == original.drops
        assert ours.after == original.after == SERVED
    assert ours.before == SERVED
    assert ours.during == [DROPPED] * 3
    assert ours.drops == [_drop_line(words)] * 3
    assert ours.after == SERVED
    assert ours.after_seconds < 2.0
    assert ours.exit_code == 0
    assert ours.stop_seconds < 2.0


def test_every_slot_is_given_back_after_the_bad_files(tmp_path: Path) -> None:
    """One server through every kind in turn, -c 1: each client's slot taken and freed."""
    directory = tmp_path / "rules"
    directory.mkdir()
    good = rules_cdb(directory, GOOD_RULES, "good.cdb")
    cdb = directory / "rules.cdb"
    shutil.copyfile(good, cdb)
    kinds = [*WORDS, *OURS_ONLY]
    with start_server(OUR_SERVER.command, ["-v", NO_LOOKUPS, "-c", "1", "-x", os.fspath(cdb)], PROGRAM) as server:
        resource.prlimit(server.pid, resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))
        for kind in kinds:
            _put_bad_file(cdb, kind, good)
            assert _talk_or_timeout(server) == DROPPED, kind
            _put_good_file(cdb, good)
            assert _talk_or_timeout(server) == SERVED, kind
        # Every slot back: a count, not the last line, which may still be the client before's
        # while the log's reader has not caught up with the last client's `1/1`.
        server.wait_for_log(r"^tcpserver: status: 0/1$", count=1 + 2 * len(kinds), timeout=5)
        lines = status_lines(server, 1)
        # The first line, then one taken and one freed per client.
        assert lines == [b"tcpserver: status: 0/1"] + [b"tcpserver: status: 1/1", b"tcpserver: status: 0/1"] * (
            2 * len(kinds)
        )
        assert len(warnings(server)) == len(kinds)
        assert server.stop(timeout=3) == 0


# ---------------------------------------------------------------- 60 MB files (rows 8 and 9)

BIG = 60 << 20


def _big_garbage(path: Path) -> None:
    """60 MB of garbage whose header names, for every key, one slot past the end, so that
    each lookup fails at once in both servers. (Bytes that name a long table inside the file,
    0xff or random ones, are scanned slot by slot: the original's children then take seconds.)"""
    new = path.with_name("garbage.new")
    with open(new, "wb") as out:
        block = struct.pack("<II", 0xFFFFFFF0, 1) * (1 << 17)
        for _ in range(BIG >> 20):
            out.write(block)
    os.replace(new, path)


@pytest.mark.parametrize("implementation", [OUR_SERVER, ORIGINAL_SERVER], ids=["ours", "original"])
def test_60_mb_of_garbage_drops_100_clients_at_once(tmp_path: Path, implementation: Implementation) -> None:
    """Row 8: the original's p50 is 0.066 s; ours was 4-10 s (the loop blocked on the copy
    while the backlog overflowed, and the SYNs waited for their retries)."""
    if implementation is ORIGINAL_SERVER and not original_available():
        pytest.skip("the original tcpserver is not installed")
    cdb = rules_cdb(tmp_path, GOOD_RULES)
    options = [NO_LOOKUPS, "-c", "100", "-x", os.fspath(cdb)]
    with start_server(implementation.command, options, PROGRAM) as server:
        assert talk(server.port) == SERVED
        _big_garbage(cdb)

        def client(_: int) -> tuple[bytes, float]:
            started = time.monotonic()
            reply = talk(server.port, timeout=30)
            return reply, time.monotonic() - started

        results = in_threads(100, client, timeout=60)
        replies = [result[0] for result in results if isinstance(result, tuple)]
        seconds = sorted(result[1] for result in results if isinstance(result, tuple))
        assert replies == [DROPPED] * 100, [result for result in results if not isinstance(result, tuple)]
        assert statistics.median(seconds) < 0.5, f"p50 {statistics.median(seconds):.3f} s, max {seconds[-1]:.3f} s"
        drop = b"unable to read " + os.fsencode(cdb) + b": protocol error"
        server.wait_for_log(drop, count=100)


def _big_full_tables(path: Path) -> None:
    """60 MB whose 256 header entries all name one table filling the file, no slot of it empty:
    every lookup probes all 7.8 million slots, and finds nothing (the client is served)."""
    slots = (BIG - 2048) // 8
    new = path.with_name("full.new")
    with open(new, "wb") as out:
        out.write(struct.pack("<II", 2048, slots) * 256)
        block = struct.pack("<II", 0xFFFFFFFF, 1) * (1 << 16)
        for start in range(0, slots, 1 << 16):
            out.write(block[: min(1 << 16, slots - start) * 8])
    os.replace(new, path)


def test_a_60_mb_cdb_of_full_tables_costs_each_client_a_mapped_scan_not_seconds(tmp_path: Path) -> None:
    """Read slot by slot with pread, each of these clients held the loop, and every other client,
    27-32 s; a file naming a table this long is copied and mapped, and scanned in about 0.1 s."""
    cdb = rules_cdb(tmp_path, GOOD_RULES)
    options = [NO_LOOKUPS, "-c", "10", "-x", os.fspath(cdb)]
    with start_server(OUR_SERVER.command, options, PROGRAM) as server:
        assert talk(server.port) == SERVED
        _big_full_tables(cdb)
        started = time.monotonic()
        results = in_threads(5, lambda _: talk(server.port, timeout=20), timeout=40)
        took = time.monotonic() - started
        assert results == [b"served \n"] * 5  # no rule found: allowed, RULES unset
        assert took < 10, f"{took:.1f} s for 5 clients"


def _big_rules(directory: Path, name: str, generation: str) -> Path:
    """A valid cdb of about 60 MB: 6,000 rules of 10 KB each, then 127.0.0.1 and the rest."""
    filler = "x" * 10_000
    lines = [f'10.{n >> 8 & 255}.{n & 255}.1:allow,FILLER="{filler}"\n' for n in range(BIG // 10_000)]
    lines.append(f'127.0.0.1:allow,RULES="{generation}"\n:deny\n')
    return rules_cdb(directory, "".join(lines), name)


def test_a_60_mb_cdb_touched_20_times_never_holds_a_client(tmp_path: Path) -> None:
    """Row 9: each change of a 60 MB cdb blocked the loop ~0.1 s (copied into memory)."""
    cdb = _big_rules(tmp_path, "rules.cdb", "good")
    assert cdb.stat().st_size > BIG
    with start_server(OUR_SERVER.command, ["-v", NO_LOOKUPS, "-x", os.fspath(cdb)], PROGRAM) as server:
        assert talk(server.port) == SERVED
        waits = []
        for touch in range(20):
            now = time.time_ns() + touch  # a new mtime each time, also within one clock tick
            os.utime(cdb, ns=(now, now))
            started = time.monotonic()
            assert talk(server.port, timeout=10) == SERVED
            waits.append(time.monotonic() - started)
        # A change is still seen at the very next client.
        _big_rules(tmp_path, "rules.cdb", "new")
        assert talk(server.port, timeout=10) == b"served new\n"
        wait_idle(server, 40, timeout=5)
        assert warnings(server) == []
    waits.sort()
    # Spawning `sh` is part of each wait: the bounds leave room for a loaded machine.
    assert statistics.median(waits) < 0.05, f"median {statistics.median(waits):.3f} s, worst {waits[-1]:.3f} s"
    assert waits[-1] < 0.25, f"worst {waits[-1]:.3f} s"


# ---------------------------------------------------------------- RulesFile in this process


def test_an_update_of_a_60_mb_cdb_costs_a_few_milliseconds(tmp_path: Path) -> None:
    cdb = _big_rules(tmp_path, "rules.cdb", "good")
    rules = RulesFile(os.fsencode(cdb))
    assert rules.decide(b"127.0.0.1", None, None).environment == [(b"RULES", b"good")]
    costs = []
    for touch in range(20):
        now = time.time_ns() + touch
        os.utime(cdb, ns=(now, now))
        started = time.perf_counter()
        rules.decide(b"127.0.0.1", None, None)
        costs.append(time.perf_counter() - started)
    rules.close()
    # 5 ms is the goal (bench/stress_rulesfile.py measures it); 25 ms leaves room for load.
    assert statistics.median(costs) < 0.025, f"median {statistics.median(costs) * 1e3:.1f} ms"


def test_a_failed_open_is_remembered_for_one_second_while_the_file_is_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FIFO is opened once per second at most, not once per client; any change of it (here,
    its removal and a good file in its place) is seen at once."""
    cdb = tmp_path / "rules.cdb"
    os.mkfifo(cdb)
    opened: list[bytes] = []
    real_open = os.open

    def counting_open(path: bytes, flags: int, *args: int, **kwargs: int) -> int:
        if os.fsencode(path) == os.fsencode(cdb):
            opened.append(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)

    def hung(number: int, frame: object) -> None:
        raise AssertionError("RulesFile hung on the FIFO")

    # A blocking open of a FIFO waits for a writer for ever: the alarm turns that into a failure.
    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        _failed_open_is_remembered(cdb, tmp_path, opened)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _failed_open_is_remembered(cdb: Path, tmp_path: Path, opened: list[bytes]) -> None:
    rules = RulesFile(os.fsencode(cdb))
    for _ in range(100):
        with pytest.raises(OSError) as failure:
            rules.decide(b"127.0.0.1", None, None)
        assert failure.value.errno == errno.EINVAL
    assert len(opened) == 1
    time.sleep(1.1)
    with pytest.raises(OSError):
        rules.decide(b"127.0.0.1", None, None)
    assert len(opened) == 2
    good = rules_cdb(tmp_path, GOOD_RULES, "good.cdb")
    os.replace(good, cdb)
    assert rules.decide(b"127.0.0.1", None, None).environment == [(b"RULES", b"good")]
    rules.close()


def test_a_verdict_is_kept_for_the_file_as_opened_and_no_longer(tmp_path: Path) -> None:
    """A client seen before is not looked up again, until a stat shows the file changed: then
    the next lookup reads the new file (tcprules renames it in, as here)."""
    cdb = rules_cdb(tmp_path, GOOD_RULES, "rules.cdb")
    rules = RulesFile(os.fsencode(cdb))
    first = rules.verdict(b"127.0.0.1", None, None)
    assert first[1:] == (False, ((b"RULES", b"good"),))
    assert rules.verdict(b"127.0.0.1", None, None) is first  # kept, not found again
    assert rules.verdict(b"127.0.0.2", None, None)[1] is True  # other facts, another verdict
    assert rules.verdict(b"127.0.0.1", b"host", None) is not first
    rules_cdb(tmp_path, '127.0.0.1:allow,RULES="new"\n:deny\n', "rules.cdb")
    assert rules.verdict(b"127.0.0.1", None, None)[2] == ((b"RULES", b"new"),)
    rules.close()


def test_the_verdicts_kept_are_bounded_whatever_the_addresses(tmp_path: Path) -> None:
    rules = RulesFile(os.fsencode(rules_cdb(tmp_path, GOOD_RULES, "rules.cdb")))
    for number in range(VERDICTS_KEPT + 1000):
        ip = b"10.%d.%d.%d" % (number >> 16 & 255, number >> 8 & 255, number & 255)
        assert rules.verdict(ip, None, None)[1] is True
        assert len(rules._verdicts) <= VERDICTS_KEPT
    rules.close()
