"""A served connection leaves no cyclic garbage: its objects go with their last reference.

Objects in a reference cycle wait for Python's cyclic collector, and a collection runs on the
loop, for every client at once: one each 150 connections or so when each connection and its slot
held each other, and a full one walks everything the server holds. Our real tcpserver runs here
under an interpreter that keeps what the collector finds (gc.DEBUG_SAVEALL) and, on SIGUSR2,
reports it on stderr by type.
"""

from __future__ import annotations

import ast
import signal
import sys

from serverproc import OURS_INSTALLED, start_server, talk
from serverstate import in_threads, wait_idle

CLIENTS = 200

# argv[1] is the command's own path: the server runs as it would from it.
_KEEPING_GARBAGE = r"""
import collections, gc, os, signal, sys
gc.set_debug(gc.DEBUG_SAVEALL)

def report(*_):
    gc.collect()
    kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    os.write(2, b"garbage: %s\n" % repr(dict(kinds)).encode())

signal.signal(signal.SIGUSR2, report)
sys.argv = sys.argv[1:]
from ucspi.cli.tcpserver import main
sys.exit(main())
"""


def test_served_connections_leave_no_cyclic_garbage() -> None:
    options = ["-H", "-R", "-l", "0", "-v", "-c", "40"]
    wrapper = [sys.executable, "-c", _KEEPING_GARBAGE]
    with start_server(OURS_INSTALLED, options, ["/bin/echo", "served"], wrapper=wrapper) as server:
        replies = in_threads(CLIENTS, lambda _: talk(server.port), timeout=60)
        assert replies == [b"served\n"] * CLIENTS
        wait_idle(server, 40)
        server.signal(signal.SIGUSR2)
        line = server.wait_for_log(r"^garbage: ")[0]
    garbage = ast.literal_eval(line.split(b": ", 1)[1].decode())
    ours = {kind: count for kind, count in garbage.items() if kind.startswith("ucspi.")}
    assert ours == {}, garbage
    assert sum(garbage.values()) < CLIENTS, garbage  # what start-up left, whatever the clients did
