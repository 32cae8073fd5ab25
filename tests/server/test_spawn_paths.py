"""The two ways a program starts (spawn.py): the C extension, and posix_spawn through ctypes
(UCSPI_NO_EXTENSION=1). The program sees the same environment, descriptors, signal state and
limits through both, the same as the C tcpserver's child; every exec failure kind is told in the
original's words, and leaves no slot taken (README, differences items 8 and 9)."""

from __future__ import annotations

import atexit
import errno
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import IN_CI
from serverproc import (
    FALLBACK_FORCED,
    ORIGINAL,
    OUR_SERVER,
    TOP,
    Implementation,
    environment_entries,
    launch,
    original_available,
    plain_environment,
    rules_cdb,
    start_server,
    talk,
)

from ucspi.errors import error_text

EXTENSION_BUILT = importlib.util.find_spec("ucspi.server._spawn") is not None
# The native launcher was built (bin/tcpserver is no link to the Python one).
LAUNCHER_BUILT = not os.path.islink(TOP / "bin" / "tcpserver")
FORCE_CTYPES = b"UCSPI_NO_EXTENSION=1"

# Each path as what ours gets added to its environment; the program must never see it.
PATHS = [
    pytest.param(
        [],
        id="extension",
        marks=[
            pytest.mark.skipif(not EXTENSION_BUILT and not IN_CI, reason="the extension was not built (no compiler)"),
            pytest.mark.skipif(FALLBACK_FORCED, reason="UCSPI_NO_EXTENSION=1: every server is on the fallback"),
        ],
    ),
    pytest.param([FORCE_CTYPES], id="ctypes"),
]

# tcpserver forced onto the ctypes path by the one switch it reads, for the comparison tests
# (tests/compat/test_tcpserver_compat.py): execve of the installed command with the environment
# as given plus UCSPI_NO_EXTENSION=1, argv unchanged (so the log keeps the name tcpserver).
_CTYPES_WRAPPER = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv)
{
    size_t count = 0;
    char **entries;
    while (environ[count])
        count++;
    entries = malloc((count + 2) * sizeof *entries);
    if (!entries)
        return 111;
    memcpy(entries, environ, count * sizeof *entries);
    entries[count] = "UCSPI_NO_EXTENSION=1";
    entries[count + 1] = NULL;
    execve(TARGET, argv, entries);
    return 111;
}
"""


@functools.cache
def ctypes_implementation() -> Implementation | None:
    """Our tcpserver through the ctypes path, as an Implementation; None without a C compiler."""
    directory = Path(tempfile.mkdtemp(prefix="ucspi-ctypes-"))
    atexit.register(shutil.rmtree, directory, True)
    source = directory / "wrapper.c"
    source.write_text(_CTYPES_WRAPPER)
    command = directory / "tcpserver"
    target = '"' + os.fspath(OUR_SERVER.command) + '"'
    try:
        built = subprocess.run(
            ["cc", "-O2", f"-DTARGET={target}", "-o", os.fspath(command), os.fspath(source)],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return None
    return Implementation("ours-ctypes", command, command) if built.returncode == 0 else None


STATUS_FIELDS = re.compile(rb"^(SigBlk|SigIgn|SigCgt):\s*([0-9a-f]+)$", re.MULTILINE)
# One program, one exec: its own status and limits as the exec left them, then its descriptors.
STATE_PROGRAM = [
    "/bin/sh",
    "-c",
    "/bin/cat /proc/self/status /proc/self/limits; echo ==;"
    ' exec /usr/bin/find /proc/self/fd/ -mindepth 1 -printf "%f %l\\n"',
]


def _state(reply: bytes) -> dict[str, object]:
    status_and_limits, _, descriptors = reply.partition(b"==\n")
    limits = status_and_limits[status_and_limits.index(b"Limit ") :]
    return {
        "signals": {name.decode(): value.decode() for name, value in STATUS_FIELDS.findall(status_and_limits)},
        "limits": limits.decode(),
        # socket:[123] and pipe:[456]: the kinds, not the inodes
        "descriptors": sorted(
            re.sub(rb"\[\d+\]|(?<=/proc/)\d+", b"", line).decode() for line in descriptors.splitlines()
        ),
    }


def _cat_state(reply: bytes) -> dict[str, object]:
    return {
        "signals": {name.decode(): value.decode() for name, value in STATUS_FIELDS.findall(reply)},
    }


def program_state(
    command: Path,
    extra: Sequence[bytes],
    *,
    wrapper: Sequence[str] = (),
    ignore_signals: Sequence[int] = (),
) -> dict[str, object]:
    environment = [*plain_environment(), *extra]
    with start_server(
        command, ["-HRl0"], STATE_PROGRAM, environment=environment, wrapper=wrapper, ignore_signals=ignore_signals
    ) as server:
        reply = talk(server.port)
    state = _state(reply)
    # cat alone, exec'd straight by the server: the shell above changes no signal, but be sure.
    with start_server(
        command,
        ["-HRl0"],
        ["/bin/cat", "/proc/self/status"],
        environment=environment,
        wrapper=wrapper,
        ignore_signals=ignore_signals,
    ) as server:
        state.update(_cat_state(talk(server.port)))
    return state


START_STATES = [
    pytest.param((), (), id="plain"),
    # Ignored at start: HUP and XFSZ stay ignored in the original's child, PIPE goes to default.
    pytest.param(("--ignore-signal=HUP,XFSZ,PIPE,USR1",), (), id="ignored"),
    # Blocked at start: the original's child unblocks only CHLD.
    pytest.param(("--block-signal=USR2,CHLD,QUIT",), (), id="blocked"),
    pytest.param(("--ignore-signal=INT,XFSZ", "--block-signal=HUP"), (), id="both"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("env_options", "ignored"), START_STATES)
def test_program_state_matches_the_originals(path: list[bytes], env_options: tuple[str, ...], ignored: tuple) -> None:
    """Signal state, limits and descriptors: ours (installed and from the checkout) = C's child."""
    wrapper = ["/usr/bin/env", *env_options] if env_options else []
    ours = program_state(OUR_SERVER.command, path, wrapper=wrapper, ignore_signals=ignored)
    if LAUNCHER_BUILT or path:
        assert program_state(TOP / "bin" / "tcpserver", path, wrapper=wrapper, ignore_signals=ignored) == ours
    if not original_available():
        pytest.skip("the original tcpserver is not installed: ours checked for agreement only")
    if not LAUNCHER_BUILT and "XFSZ" in " ".join(env_options):
        pytest.skip("without the native launcher an ignored SIGXFSZ is not seen (README, differences item 8)")
    assert ours == program_state(ORIGINAL, [], wrapper=wrapper, ignore_signals=ignored)


@pytest.mark.parametrize("path", PATHS)
def test_no_signal_is_left_ignored_or_blocked(path: list[bytes]) -> None:
    """glibc's 32 and 33 included (posix_spawn used to leave them ignored), and no handler.
    The server starts with every signal at its default: run in the background, the tests
    themselves may have INT and QUIT ignored."""
    state = program_state(OUR_SERVER.command, path, wrapper=["/usr/bin/env", "--default-signal"])
    assert state["signals"] == {
        "SigBlk": "0000000000000000",
        "SigIgn": "0000000000000000",
        "SigCgt": "0000000000000000",
    }


ODD_ENVIRONMENT = [b"PATH=/usr/bin:/bin", b"ZED=1", b"ALPHA=2", b"ZED=3", b"NO_EQUALS", b"HIGH=\xff", b"=empty"]


def _environment(command: Path, environment: list[bytes], rules: Path | None) -> list[bytes]:
    options = ["-HRl0", *(["-x", os.fspath(rules)] if rules else [])]
    with start_server(command, options, ["/bin/cat", "/proc/self/environ"], environment=environment) as server:
        entries = environment_entries(talk(server.port))
    return [re.sub(rb"^(TCPLOCALPORT|TCPREMOTEPORT)=\d+$", rb"\1=PORT", entry) for entry in entries]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("initial", "rules"),
    [
        pytest.param(plain_environment({b"FOO": b"bar"}), None, id="plain"),
        pytest.param(ODD_ENVIRONMENT, None, id="odd"),
        pytest.param(ODD_ENVIRONMENT, '127.0.0.1:allow,ZED="rule",="x",NEW="n"\n', id="odd-rules"),
        pytest.param([], None, id="empty"),
    ],
)
def test_environment_is_the_same_both_ways(
    path: list[bytes], initial: list[bytes], rules: str | None, tmp_path: Path
) -> None:
    cdb = rules_cdb(tmp_path, rules) if rules else None
    # The switch comes first or last: neither place shows in the program's environment.
    ours = _environment(OUR_SERVER.command, [*path, *initial], cdb)
    assert _environment(OUR_SERVER.command, [*initial, *path], cdb) == ours
    assert not [entry for entry in ours if entry.startswith(b"UCSPI_NO_EXTENSION")]
    if original_available():
        assert ours == _environment(ORIGINAL, initial, cdb)


# ---------------------------------------------------------------- exec failures


@contextmanager
def _failing_program(kind: str, directory: Path) -> Iterator[list[str]]:
    """A program that fails to exec with `kind`; leaving the block makes it runnable."""
    program = directory / "program"
    script = b"#!/bin/sh\necho served\n"
    opened: int | None = None
    if kind == "ENOENT":
        pass
    elif kind == "EACCES":
        program.write_bytes(script)
        program.chmod(0o644)
    elif kind == "ENOEXEC":
        program.write_bytes(b"\x7fELF but not really\n")
        program.chmod(0o755)
    elif kind == "ETXTBSY":
        program.write_bytes(script)
        program.chmod(0o755)
        opened = os.open(program, os.O_WRONLY)
    elif kind == "ELOOP":
        program.symlink_to(program)
    try:
        yield [os.fspath(program)]
    finally:
        if opened is not None:
            os.close(opened)
    program.unlink(missing_ok=True)
    program.write_bytes(script)
    program.chmod(0o755)


EXEC_FAILURES = ["ENOENT", "EACCES", "ENOEXEC", "ETXTBSY", "ELOOP"]


def _exec_failure(command: Path, extra: Sequence[bytes], kind: str, directory: Path) -> tuple[list[bytes], bytes]:
    """The warning lines of a client whose program cannot run, then a later client's reply (-c 1)."""
    directory.mkdir()
    with _failing_program(kind, directory) as program:
        server = start_server(command, ["-c1", "-HRl0"], program, environment=[*plain_environment(), *extra])
        try:
            assert talk(server.port) == b""
            warnings = server.wait_for_log(r"warning: dropping connection")
        except BaseException:
            server.stop()
            raise
    try:
        later = talk(server.port)
    finally:
        server.stop()
    return [line.replace(os.fsencode(directory), b"DIR") for line in warnings], later


def _expected_text(kind: str) -> bytes:
    return error_text(getattr(errno, kind)).encode()  # the original's words (ucspi/errors.py)


def _kernel_refuses_to_run_a_file_open_for_writing(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"#!/bin/sh\n")
    probe.chmod(0o755)
    opened = os.open(probe, os.O_WRONLY)
    try:
        subprocess.run([probe], capture_output=True, timeout=10, check=False)
    except OSError as error:
        return error.errno == errno.ETXTBSY
    finally:
        os.close(opened)
        probe.unlink()
    return False


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", EXEC_FAILURES)
def test_exec_failure_is_told_and_frees_the_slot(path: list[bytes], kind: str, tmp_path: Path) -> None:
    if kind == "ETXTBSY" and not _kernel_refuses_to_run_a_file_open_for_writing(tmp_path):
        pytest.skip("this kernel runs a file open for writing (no ETXTBSY to provoke)")
    ours = _exec_failure(OUR_SERVER.command, path, kind, tmp_path / "ours")
    assert ours[1] == b"served\n"
    if original_available():
        original = _exec_failure(ORIGINAL, [], kind, tmp_path / "original")
        assert ours == original
    assert ours[0] == [b"tcpserver: warning: dropping connection, unable to run DIR/program: " + _expected_text(kind)]


def _e2big(command: Path, extra: Sequence[bytes], directory: Path) -> tuple[list[bytes], bytes]:
    # One value past MAX_ARG_STRLEN (128 KiB) for 127.0.0.2 only; 127.0.0.1 is served.
    directory.mkdir()
    cdb = rules_cdb(directory, '127.0.0.2:allow,BIG="' + "x" * 200_000 + '"\n:allow\n')
    with start_server(
        command,
        ["-c1", "-HRl0", "-x", os.fspath(cdb)],
        ["/bin/echo", "served"],
        environment=[*plain_environment(), *extra],
    ) as server:
        assert talk(server.port, source="127.0.0.2") == b""
        warnings = server.wait_for_log(r"warning: dropping connection")
        later = talk(server.port)
    return warnings, later


@pytest.mark.parametrize("path", PATHS)
def test_e2big_is_told_and_frees_the_slot(path: list[bytes], tmp_path: Path) -> None:
    ours = _e2big(OUR_SERVER.command, path, tmp_path / "ours")
    assert ours == (
        [b"tcpserver: warning: dropping connection, unable to run /bin/echo: " + _expected_text("E2BIG")],
        b"served\n",
    )
    if original_available():
        assert _e2big(ORIGINAL, [], tmp_path / "original") == ours


@pytest.mark.parametrize("path", PATHS)
def test_pathexec_search_goes_on_past_eacces_and_reports_it(path: list[bytes], tmp_path: Path) -> None:
    """PATH=DIR1:DIR2: DIR1/prog not executable, DIR2 has none: EACCES remembered, told at the end;
    then DIR2/prog appears and is run."""
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    (first / "prog").write_bytes(b"#!/bin/sh\necho first\n")
    (first / "prog").chmod(0o644)
    environment = [f"PATH={first}:{second}:/usr/bin:/bin".encode(), *path]
    with start_server(OUR_SERVER.command, ["-c1", "-HRl0"], ["prog"], environment=environment) as server:
        assert talk(server.port) == b""
        warning = server.wait_for_log(r"warning: dropping connection")
        (second / "prog").write_bytes(b"#!/bin/sh\necho second\n")
        (second / "prog").chmod(0o755)
        assert talk(server.port) == b"second\n"
    assert warning == [b"tcpserver: warning: dropping connection, unable to run prog: " + _expected_text("EACCES")]


def test_version_names_the_path() -> None:
    for extra, expected in (
        ([], b"clone extension" if EXTENSION_BUILT else b"posix_spawn (ctypes)"),
        ([FORCE_CTYPES], b"posix_spawn (ctypes)"),
    ):
        env = dict(entry.split(b"=", 1) for entry in [*plain_environment(), *extra])
        result = subprocess.run(
            [OUR_SERVER.command, "--version"], env=env, capture_output=True, timeout=20, check=False
        )
        assert result.stdout.endswith(b", spawn: " + expected + b"\n")


@pytest.mark.skipif(not FALLBACK_FORCED, reason="for a run with UCSPI_NO_EXTENSION=1 (.ci/run's second pass)")
def test_a_forced_run_starts_every_server_on_the_fallback() -> None:
    """What the second pass proves is the fallback's: the servers the tests start say ctypes."""
    process = launch(OUR_SERVER.command, ["--version"])
    stdout, _ = process.communicate(timeout=20)
    assert stdout.endswith(b", spawn: posix_spawn (ctypes)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="-u/-g change ids, which needs root")
@pytest.mark.parametrize("path", PATHS)
def test_either_path_spawns_after_the_ids_change(path: list[bytes]) -> None:
    """-u and -g come before the spawner is made: what it needs is loaded before, whoever may read it after."""
    environment = [*plain_environment(), *path]
    with start_server(
        OUR_SERVER.command, ["-u65534", "-g65534", "-HRl0"], ["/usr/bin/id", "-u"], environment=environment
    ) as server:
        assert talk(server.port) == b"65534\n"
