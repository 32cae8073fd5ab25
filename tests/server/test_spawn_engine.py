"""The extension's engine on its own (ucspi/server/_spawn.c), in a process of its own per case:
its clone does not wait for the exec, its children run on the stacks of a pool, and a clone
with every slot taken (or none: slots=0) waits for its child. Each way, every child must get
its own job, and every end and failed exec must come back once, under its token."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ucspi.server._spawn") is None, reason="the extension is not built (no C compiler)"
)

# Spawns `count` children of argv (candidates: the paths tried), each with TOKEN=<its token> (and
# BIG=<big x's> if big) and its stdout on a pipe of its own, then reaps until every one has ended
# (at most 20 s).
_DRIVER = r"""
import json, os, sys, time
from ucspi.server import _spawn as engine
candidates, argv, slots, count, big = json.loads(sys.argv[1])
foreign = os.fork()
if foreign == 0:
    os._exit(7)  # a child the process had before the engine: reaped, never told
engine.start_engine([c.encode() for c in candidates], [a.encode() for a in argv], slots)
null = os.open("/dev/null", os.O_RDONLY)
pipes = {}
for token in range(1, count + 1):
    read_end, write_end = os.pipe()
    environment = [b"TOKEN=%d" % token, *([b"BIG=" + b"x" * big] if big else [])]
    pid = engine.spawn(token, environment, null, write_end, ())
    os.close(write_end)
    pipes[token] = (pid, read_end)
events, deadline = [], time.monotonic() + 20
while sum(1 for kind, _, _ in events if kind == 3) < count and time.monotonic() < deadline:
    ended, complete = engine.reap()
    assert complete
    events.extend(ended)
    time.sleep(0.005)
outputs = {}
for token, (pid, read_end) in pipes.items():
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    outputs[token] = b"".join(chunks).decode()
try:
    os.waitpid(foreign, os.WNOHANG)
    foreign_left = True
except ChildProcessError:
    foreign_left = False
print(json.dumps({"events": events, "outputs": outputs, "foreign_left": foreign_left}))
"""


def _drive(candidates: list[str], argv: list[str], slots: int, count: int, big: int = 0) -> dict:
    arguments = json.dumps([candidates, argv, slots, count, big])
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, arguments], capture_output=True, timeout=60, check=False, cwd=os.getcwd()
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


@pytest.mark.parametrize("slots", [0, 1, 2, 128])
def test_every_child_runs_its_own_job_and_ends_once(slots: int) -> None:
    count = 60
    result = _drive(["/bin/sh"], ["sh", "-c", 'printf %s "$TOKEN"'], slots, count)
    assert result["outputs"] == {str(token): str(token) for token in range(1, count + 1)}
    assert sorted(result["events"]) == [[3, token, 0] for token in range(1, count + 1)]
    assert result["foreign_left"] is False


@pytest.mark.parametrize("slots", [0, 128])
def test_a_failed_exec_is_told_before_its_end_of_111(slots: int) -> None:
    result = _drive(["/nonexistent/one", "/nonexistent/two"], ["program"], slots, 5)
    events = result["events"]
    for token in range(1, 6):
        told = [event[::2] for event in events if event[1] == token]
        assert told == [[1, errno.ENOENT], [3, 111 << 8]], events
    assert result["outputs"] == {str(token): "" for token in range(1, 6)}


@pytest.mark.parametrize("slots", [0, 128])
def test_e2big_is_the_execs_failure(slots: int) -> None:
    result = _drive(["/bin/sh"], ["sh", "-c", "echo ran"], slots, 3, big=200_000)  # past MAX_ARG_STRLEN
    assert sorted(result["events"]) == sorted(
        [[1, token, errno.E2BIG] for token in range(1, 4)] + [[3, token, 111 << 8] for token in range(1, 4)]
    )


def test_a_search_goes_on_past_a_missing_candidate() -> None:
    result = _drive(["/nonexistent/sh", "/bin/sh"], ["sh", "-c", 'printf %s "$TOKEN"'], 128, 4)
    assert result["outputs"] == {str(token): str(token) for token in range(1, 5)}
    assert sorted(result["events"]) == [[3, token, 0] for token in range(1, 5)]
