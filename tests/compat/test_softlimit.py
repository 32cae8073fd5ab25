"""`softlimit ... tcpserver ... program` (daemontools), as qmail's run files have it: ours starts
wherever the C tcpserver starts, serves, and runs the program under exactly the limits the C
server's child gets (README, differences item 9). Needs the native launcher (bin/tcpserver.c)
and the extension: without a compiler, Python itself must fit under the limits, as before."""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from conftest import IN_CI, needs_tool
from serverproc import (
    FALLBACK_FORCED,
    ORIGINAL,
    OUR_SERVER,
    TOP,
    launch,
    original_available,
    plain_environment,
    start_server,
    talk,
)

LAUNCHER_BUILT = not os.path.islink(TOP / "bin" / "tcpserver")
EXTENSION_BUILT = importlib.util.find_spec("ucspi.server._spawn") is not None
FORCE_FALLBACK = b"UCSPI_NO_EXTENSION=1"
# On the fallback (.ci/run's second pass) the limits hold for the server too, as without the
# launcher: Python has no room under 3 MB, and the server's own limits are not lifted.
LIFTED_ONLY = pytest.mark.skipif(
    FALLBACK_FORCED, reason="UCSPI_NO_EXTENSION=1: the limits hold for the server (README, differences item 9)"
)

pytestmark = [
    needs_tool("softlimit", "daemontools"),
    pytest.mark.skipif(
        not (LAUNCHER_BUILT and EXTENSION_BUILT) and not IN_CI,
        reason="built without a C compiler: no native launcher or extension (README: softlimit)",
    ),
]

# -m 3000000 is about where the C tcpserver itself stops starting on this kind of machine.
LIMITS = [
    pytest.param(["-m", "3000000"], id="m-3MB", marks=LIFTED_ONLY),
    pytest.param(["-m", "64000000"], id="m-64MB"),
    pytest.param(["-a", "3000000"], id="a", marks=LIFTED_ONLY),
    pytest.param(["-d", "3000000"], id="d", marks=LIFTED_ONLY),
    pytest.param(["-s", "200000"], id="s"),
    # About where the C tcpserver starts (below it, it crashes in the dynamic loader): the
    # launcher's own buffers must not be on the stack it has not lifted yet.
    pytest.param(["-s", "20000"], id="s-20kB", marks=LIFTED_ONLY),
    pytest.param(["-o", "40"], id="o"),
    pytest.param(["-p", "30"], id="p"),
    pytest.param(["-f", "100000"], id="f"),
    pytest.param(["-c", "0"], id="c"),
]

PROGRAM = ["/bin/cat", "/proc/self/limits"]


def _served_limits(command: Path, limits: list[str], options: list[str]) -> bytes:
    with start_server(
        command, ["-HRl0", *options], PROGRAM, environment=plain_environment(), wrapper=["softlimit", *limits]
    ) as server:
        first = talk(server.port)
        assert talk(server.port) == first  # and again: the server is still serving
    return first


@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("command", [OUR_SERVER.command, TOP / "bin" / "tcpserver"], ids=["installed", "checkout"])
def test_starts_serves_and_the_program_gets_the_limits(command: Path, limits: list[str]) -> None:
    ours = _served_limits(command, limits, [])
    assert ours.startswith(b"Limit ")
    if original_available():
        assert ours == _served_limits(ORIGINAL, limits, [])


@pytest.mark.parametrize(
    "limits",
    [pytest.param(["-m", "3000000"], id="m-3MB", marks=LIFTED_ONLY), pytest.param(["-m", "64000000"], id="m-64MB")],
)
def test_threads_and_lookups_under_the_limit(limits: list[str]) -> None:
    """Default lookups (the DNS library loaded) and -c 100: every thread fits, and sizes its own stack."""
    ours = _served_limits(OUR_SERVER.command, limits, ["-c100", "-h"])
    if original_available():
        assert ours == _served_limits(ORIGINAL, limits, ["-c100", "-h"])


@LIFTED_ONLY
def test_the_limits_are_not_the_servers_own() -> None:
    """The server itself runs with its soft limits lifted (that is what lets Python start)."""
    with start_server(
        OUR_SERVER.command, ["-HRl0"], PROGRAM, environment=plain_environment(), wrapper=["softlimit", "-m", "3000000"]
    ) as server:
        own = Path(f"/proc/{server.pid}/limits").read_bytes()
        program = talk(server.port)
    assert own != program
    address_space = [line for line in program.splitlines() if line.startswith(b"Max address space")]
    assert address_space and b"3000000" in address_space[0]


def _limits_after_lowering(command: Path) -> bytes:
    """Under softlimit -o 40, the server's descriptor limit then lowered to 30/30 from outside."""
    with start_server(
        command, ["-HRl0"], PROGRAM, environment=plain_environment(), wrapper=["softlimit", "-o", "40"]
    ) as server:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (30, 30))
        return talk(server.port)


def test_a_hard_limit_lowered_since_caps_the_programs() -> None:
    """The soft limit given back never exceeds the hard limit as it is now, nor raises it
    (a server with CAP_SYS_RESOURCE could)."""
    ours = _limits_after_lowering(OUR_SERVER.command)
    assert [line.split()[3:5] for line in ours.splitlines() if line.startswith(b"Max open files")] == [[b"30", b"30"]]
    if original_available():
        assert ours == _limits_after_lowering(ORIGINAL)


@LIFTED_ONLY
def test_core_file_and_cpu_limits_stay_on_the_server() -> None:
    """Only what Python needs room in is lifted: a server held to no core dump dumps none."""
    with start_server(
        OUR_SERVER.command,
        ["-HRl0"],
        PROGRAM,
        environment=plain_environment(),
        wrapper=["softlimit", "-c", "0", "-f", "100000", "-t", "3600", "-m", "3000000"],
    ) as server:
        own = resource.prlimit(server.pid, resource.RLIMIT_CORE), resource.prlimit(server.pid, resource.RLIMIT_FSIZE)
        cpu = resource.prlimit(server.pid, resource.RLIMIT_CPU)
        address_space = resource.prlimit(server.pid, resource.RLIMIT_AS)
    assert (own[0][0], own[1][0], cpu[0]) == (0, 100000, 3600)
    assert address_space[0] == address_space[1]  # lifted


def test_the_fallback_under_a_small_limit_says_so_and_exits_111() -> None:
    """On the ctypes path softlimit's limits are put back on the server itself (spawn.py: nothing
    could give them to the program), so under `-m 3000000` Python has no room for its threads:
    one fatal line in the original's style, exit 111, no traceback."""
    process = launch(
        OUR_SERVER.command,
        ["-HRl0", "127.0.0.1", "0", "/bin/true"],
        environment=[*plain_environment(), FORCE_FALLBACK],
        wrapper=["softlimit", "-m", "3000000"],
    )
    stdout, stderr = process.communicate(timeout=20)
    assert (process.returncode, stdout, stderr) == (
        111,
        b"",
        b"tcpserver: fatal: unable to start thread: resource limit reached\n",
    )
