"""The program's scheduling attributes are the original's child's: its policy, and its slice (the
kernel's default, or the server's own custom one), though the engine's child puts them again
before its exec (ucspi/server/_spawn.c, requeue_with_the_same_attributes)."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_tool
from serverproc import ORIGINAL, OUR_SERVER, original_available, start_server, talk

# The program is grep itself (sh execs it), reading its own scheduler lines.
PROGRAM = ["/bin/sh", "-c", r"exec grep -E '^(policy|se\.slice) ' /proc/self/sched"]
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine())
# Sets a custom slice (sched_attr's runtime for SCHED_OTHER, Linux 6.12+) on itself, then execs.
_WITH_SLICE = r"""
import ctypes, os, struct, sys
attributes = ctypes.create_string_buffer(struct.pack("IIQiIQQQII", 56, 0, 0, 0, 0, int(sys.argv[1]), 0, 0, 0, 0))
if ctypes.CDLL(None, use_errno=True).syscall(int(sys.argv[2]), 0, attributes, 0) != 0:
    sys.exit("sched_setattr: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[3], sys.argv[3:])
"""


def _program_sees(command: Path, wrapper: list[str]) -> dict[str, str]:
    with start_server(command, ["-HRl0"], PROGRAM, wrapper=wrapper) as server:
        reply = talk(server.port)
    lines = dict(re.findall(rb"^(\S+)\s+:\s+(\S+)$", reply, re.MULTILINE))
    return {name.decode(): value.decode() for name, value in lines.items()}


def _custom_slice_wrapper(nanoseconds: int) -> list[str]:
    if _SCHED_SETATTR is None:
        pytest.skip(f"no sched_setattr number for {platform.machine()}")
    return [sys.executable, "-c", _WITH_SLICE, str(nanoseconds), str(_SCHED_SETATTR)]


def _slice_is_settable() -> bool:
    if _SCHED_SETATTR is None:
        return False
    wrapper = [*_custom_slice_wrapper(500_000), "/bin/grep", "-E", r"^se\.slice ", "/proc/self/sched"]
    done = subprocess.run(wrapper, capture_output=True, check=False)
    return done.returncode == 0 and done.stdout.split()[-1:] == [b"500000"]


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("default", id="default"),
        pytest.param("batch", id="chrt-batch", marks=needs_tool("chrt", "util-linux")),
        pytest.param("slice", id="custom-slice"),
    ],
)
def test_the_programs_policy_and_slice_are_the_originals(how: str) -> None:
    if how == "slice" and not _slice_is_settable():
        pytest.skip("this kernel takes no custom slice for SCHED_OTHER (Linux 6.12+)")
    wrapper = {"default": [], "batch": ["chrt", "--batch", "0"], "slice": _custom_slice_wrapper(500_000)}[how]
    ours = _program_sees(OUR_SERVER.command, wrapper)
    assert "policy" in ours, ours
    if how == "batch":
        assert ours["policy"] == "3"  # SCHED_BATCH
    if how == "slice":
        assert ours.get("se.slice") == "500000", ours
    if original_available():
        assert ours == _program_sees(ORIGINAL, wrapper)
