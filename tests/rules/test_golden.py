"""Our tcprules against the golden files the original wrote (tests/data/golden, see its README).

The tcprules comparison needs only the stored files. The tcprulescheck part runs both checkers on
the original's cdb files and is skipped where /usr/bin/tcprulescheck is not installed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden"
OUR_TCPRULES = ROOT / "bin" / "tcprules"
OUR_TCPRULESCHECK = ROOT / "bin" / "tcprulescheck"
ORIGINAL_TCPRULESCHECK = Path("/usr/bin/tcprulescheck")
# The names make_golden.py gave the original: they appear in its messages.
CDB_NAME = "rules.cdb"
TMP_NAME = "rules.tmp"
# Only PATH, so the launcher's `env python3` works and nothing else leaks in.
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

CASES = sorted(path.stem for path in GOLDEN.glob("*.rules"))
COMPILED = [name for name in CASES if (GOLDEN / f"{name}.cdb").exists()]


def test_golden_set_is_complete() -> None:
    """Guards against a half-generated golden directory silently shrinking the test."""
    assert len(CASES) >= 45
    for name in CASES:
        assert (GOLDEN / f"{name}.exit").exists(), name
        assert (GOLDEN / f"{name}.stderr").exists(), name
        assert ((GOLDEN / f"{name}.exit").read_text() == "0\n") == (name in COMPILED), name


@pytest.mark.parametrize("name", CASES)
def test_tcprules_matches_original(name: str, tmp_path: Path) -> None:
    with open(GOLDEN / f"{name}.rules", "rb") as rules:
        result = subprocess.run(
            [OUR_TCPRULES, CDB_NAME, TMP_NAME], stdin=rules, cwd=tmp_path, capture_output=True, env=BASE_ENV
        )
    assert result.stdout == b""
    assert result.stderr == (GOLDEN / f"{name}.stderr").read_bytes()
    assert f"{result.returncode}\n" == (GOLDEN / f"{name}.exit").read_text()
    expected_cdb = GOLDEN / f"{name}.cdb"
    if expected_cdb.exists():
        assert (tmp_path / CDB_NAME).read_bytes() == expected_cdb.read_bytes()
        assert not (tmp_path / TMP_NAME).exists()  # renamed, not copied
    else:
        assert not (tmp_path / CDB_NAME).exists()


def cdb_keys(cdb: bytes) -> list[bytes]:
    """The record keys of a tcprules cdb in file order (docs/behaviour.md §2.1): records end where table 0 starts."""
    end = struct.unpack_from("<I", cdb, 0)[0]
    keys = []
    position = 2048
    while position < end:
        key_length, data_length = struct.unpack_from("<II", cdb, position)
        keys.append(cdb[position + 8 : position + 8 + key_length])
        position += 8 + key_length + data_length
    return keys


def client_for_key(key: bytes) -> dict[bytes, bytes]:
    """TCPREMOTE* values that should reach this key in the lookup order of docs/behaviour.md §5."""
    if b"@" in key:
        info, _, rest = key.partition(b"@")
        if rest.startswith(b"="):
            return {b"TCPREMOTEINFO": info, b"TCPREMOTEHOST": rest[1:], b"TCPREMOTEIP": b"192.0.2.1"}
        return {b"TCPREMOTEINFO": info, b"TCPREMOTEIP": rest}
    if key.startswith(b"=."):
        return {b"TCPREMOTEIP": b"192.0.2.1", b"TCPREMOTEHOST": b"client" + key[1:]}
    if key.startswith(b"="):
        return {b"TCPREMOTEIP": b"192.0.2.1", b"TCPREMOTEHOST": key[1:]}
    if key.endswith(b"."):
        return {b"TCPREMOTEIP": key + b"77"}
    if not key:
        return {b"TCPREMOTEIP": b"192.0.2.1"}
    return {b"TCPREMOTEIP": key}


def clients_for(keys: list[bytes], limit: int = 3) -> list[dict[bytes, bytes]]:
    """A few clients spread over the distinct keys, plus one that matches none of them."""
    # A NUL cannot travel in the environment; such keys are covered by the byte comparison.
    usable = list(dict.fromkeys(key for key in keys if b"\x00" not in key))
    if len(usable) > limit:
        step = (len(usable) - 1) / (limit - 1)
        usable = [usable[round(index * step)] for index in range(limit)]
    clients = [client_for_key(key) for key in usable]
    clients.append({b"TCPREMOTEIP": b"203.0.113.9", b"TCPREMOTEHOST": b"nomatch.invalid", b"TCPREMOTEINFO": b"x"})
    return clients


def check(program: Path, cdb: Path, client: dict[bytes, bytes]) -> tuple[int, bytes, bytes]:
    env = {os.fsencode(name): os.fsencode(value) for name, value in BASE_ENV.items()} | client
    result = subprocess.run([program, cdb], capture_output=True, env=env)
    return result.returncode, result.stdout, result.stderr


def test_client_for_key_reaches_each_form() -> None:
    assert client_for_key(b"joe@=h.x") == {
        b"TCPREMOTEINFO": b"joe",
        b"TCPREMOTEHOST": b"h.x",
        b"TCPREMOTEIP": b"192.0.2.1",
    }
    assert client_for_key(b"=.example.com")[b"TCPREMOTEHOST"] == b"client.example.com"
    assert client_for_key(b"=") == {b"TCPREMOTEIP": b"192.0.2.1", b"TCPREMOTEHOST": b""}
    assert client_for_key(b"10.") == {b"TCPREMOTEIP": b"10.77"}


@pytest.mark.skipif(not ORIGINAL_TCPRULESCHECK.exists(), reason="the original /usr/bin/tcprulescheck is not installed")
@pytest.mark.parametrize("name", COMPILED)
def test_tcprulescheck_agrees_on_golden_cdb(name: str, tmp_path: Path) -> None:
    cdb = tmp_path / CDB_NAME
    shutil.copyfile(GOLDEN / f"{name}.cdb", cdb)
    clients = clients_for(cdb_keys(cdb.read_bytes()))
    # Python start-up dominates: run the clients side by side to keep the suite quick.
    with ThreadPoolExecutor(max_workers=4) as pool:
        ours = list(pool.map(lambda client: check(OUR_TCPRULESCHECK, cdb, client), clients))
    for client, our_result in zip(clients, ours, strict=True):
        assert our_result == check(ORIGINAL_TCPRULESCHECK, cdb, client), client
        assert our_result[0] == 0
