"""make fuzz's differential check on a few hundred inputs inside make test (and its shrinker).

Each input, less the lines of README, differences item 5, goes to /usr/bin/tcprules and to our
compile_rules() in the same directory; some also through bin/tcprules (tests/fuzz/tcprules_fuzz.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import tcprules_fuzz

pytestmark = pytest.mark.skipif(
    not Path(tcprules_fuzz.ORIGINAL.decode()).exists(), reason="the original tcprules is not installed"
)


@pytest.fixture
def space() -> Iterator[tcprules_fuzz.Workspace]:
    workspace = tcprules_fuzz.Workspace()
    yield workspace
    workspace.close()


def test_a_differential_chunk() -> None:
    chunk = tcprules_fuzz.Chunk("differential", 0, 20261129, count=400, deadline=time.time() + 120, cli_every=100)
    result = tcprules_fuzz.run_chunk(chunk)
    assert result.findings == []
    assert result.inputs == 400


def test_range_edges_table_sample() -> None:
    table = tuple(tcprules_fuzz.rule_inputs.range_edges()[::20])
    chunk = tcprules_fuzz.Chunk("differential", 0, 1, count=0, deadline=time.time() + 120, fixed=table)
    assert tcprules_fuzz.run_chunk(chunk).findings == []


def test_a_difference_is_found_and_shrunk(space: tcprules_fuzz.Workspace) -> None:
    # An IPv6 line is a difference the fuzz exempts; given raw, it must be reported and shrunk.
    text = b"# x\n1.2.3.4:allow\n::1:allow\n5.6.7.8:deny\n"
    assert tcprules_fuzz.differential_problem(space, text, old_cdb=True, cli=False) is not None
    assert (
        tcprules_fuzz.shrink(
            lambda candidate: tcprules_fuzz.differential_problem(space, candidate, True, False) is not None, text
        )
        == b":::allow"
    )
