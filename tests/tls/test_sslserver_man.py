"""man/sslserver.1 has tcpserver.1's log-formats paragraph, under sslserver's name, with its events."""

from __future__ import annotations

import re
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TOP / "man"))
import generate  # noqa: E402  man/generate.py


def _page(name: str) -> str:
    return (TOP / "man" / name).read_text()


def test_sslserver_1_has_the_log_formats_paragraph() -> None:
    page = _page("sslserver.1")
    assert "\n".join(generate.log_formats("sslserver")) in page
    assert ".B \\-\\-log=logfmt" in page and ".B \\-\\-log=json" in page
    assert '.I "sslserver: ev=NAME key=value ..."' in page
    assert "\\(dqprog\\(dq:\\(dqsslserver\\(dq" in page
    listed = re.search(r"^where NAME is (.*)\.$", page, re.MULTILINE)
    assert listed is not None
    names = set(re.split(r", | or ", listed.group(1)))
    assert {"tls", "truncated", "drop", "end", "drain"} <= names
    assert names == set(generate.event_names())


def test_tcpserver_1_lists_the_same_events_but_sslserver_s() -> None:
    """tcpserver.1's paragraph is written by hand: the generator's list is checked against it."""
    listed = re.search(r"^where NAME is (.*)$\n^(.*)\.$", _page("tcpserver.1"), re.MULTILINE)
    assert listed is not None
    names = set(re.split(r" or |,? ", " ".join(listed.groups())))
    assert names - {""} == set(generate.event_names(tls=False))
