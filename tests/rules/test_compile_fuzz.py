"""make fuzz's in-process check, on a few thousand inputs inside make test.

Hostile rules files (grammar with bad lines, raw bytes, CRLF, long lines, IPv6 and CIDR) through
our parser and compiler: only Fatal escapes, a parse error leaves the previous cdb as it was, and
every compiled cdb reads back to exactly the parsed records (tests/fuzz/tcprules_fuzz.py).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import UNIT, raw_rule_files, rule_files
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import tcprules_fuzz


@pytest.fixture(scope="module")
def space() -> Iterator[tcprules_fuzz.Workspace]:
    workspace = tcprules_fuzz.Workspace()
    yield workspace
    workspace.close()


@UNIT
@given(st.one_of(rule_files(valid_only=False), raw_rule_files()), st.randoms(use_true_random=False))
def test_hostile_files_compile_or_fail_as_designed(
    space: tcprules_fuzz.Workspace, text: bytes, blocks: random.Random
) -> None:
    assert tcprules_fuzz.in_process_problem(space, blocks, text) is None


def test_a_chunk_of_every_kind() -> None:
    chunk = tcprules_fuzz.Chunk("in-process", 0, seed=20261129, count=3000, deadline=time.time() + 120)
    result = tcprules_fuzz.run_chunk(chunk)
    assert result.findings == []
    assert result.inputs == 3000
    assert set(result.kinds) == set(tcprules_fuzz.rule_inputs.KINDS)
