"""A served connection leaves no cyclic garbage: its objects go with their last reference.

Objects in a reference cycle wait for Python's cyclic collector, and a collection runs on the
loop, for every client at once: one each 150 connections or so when each connection and its slot
held each other, and a full one walks everything the server holds. The real tcpserver runs here
under serverstate.KEEPING_GARBAGE, which keeps what the collector finds and reports it by type.
"""

from __future__ import annotations

import sys

from serverproc import OURS_INSTALLED, start_server, talk
from serverstate import KEEPING_GARBAGE, garbage_added, garbage_kinds, in_threads, wait_idle

CLIENTS = 200


def test_served_connections_leave_no_cyclic_garbage() -> None:
    options = ["-H", "-R", "-l", "0", "-v", "-c", "40"]
    wrapper = [sys.executable, "-c", KEEPING_GARBAGE]
    with start_server(OURS_INSTALLED, options, ["/bin/echo", "served"], wrapper=wrapper) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        before = garbage_kinds(server)  # what start-up left
        replies = in_threads(CLIENTS, lambda _: talk(server.port), timeout=60)
        assert replies == [b"served\n"] * CLIENTS
        wait_idle(server, 40)
        added = garbage_added(before, garbage_kinds(server))
    assert added == {}, added
