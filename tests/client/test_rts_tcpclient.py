"""The tcpclient sections of ucspi-tcp 0.88's regression suite (rts), run on our commands.

Retold from the upstream `rts.tests` as a list of shell steps. As in `rts.sh`, each step runs
with an environment of PATH alone (plus DNSCACHEIP, for the fake DNS that stands in for the
"DNS cache translating 127.0.0.1 <-> localhost" the script assumes), stderr merged into stdout.
The fixed ports become free ones, written back as the script's numbers (50016 for the server,
50017-50020 for the clients' -p), so one expected file serves every run. It was written by this
script run against the original (Debian's tcpclient and tcpserver):

    .venv/bin/python tests/client/test_rts_tcpclient.py --write-expected
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clientproc import ORIGINAL, OURS, original_available
from fakes import FakeDNS, fresh_loopback
from serverproc import ORIGINAL_SERVER, OUR_SERVER, start_server

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = ROOT / "tests" / "data" / "rts" / "tcpclient.exp"
SERVER_PORT_NAME = "50016"
CLIENT_PORT_NAMES = ("50017", "50018", "50019", "50020")

PRINT = """#!/bin/sh
  trap "" 13
  echo PROTO="$PROTO"
  echo TCPLOCALHOST="${TCPLOCALHOST-unset}"
  echo TCPLOCALIP="${TCPLOCALIP-unset}"
  echo TCPLOCALPORT="${TCPLOCALPORT-unset}"
  echo TCPREMOTEHOST="${TCPREMOTEHOST-unset}"
  echo TCPREMOTEIP="${TCPREMOTEIP-unset}"
  echo TCPREMOTEPORT="${TCPREMOTEPORT-unset}"
  echo TCPREMOTEINFO="${TCPREMOTEINFO-unset}"
"""

# (heading, command): `echo HEADING`, then `COMMAND 2>&1; echo $?`.
SCRIPT: list[tuple[str, str]] = [
    ("--- tcpclient prints usage message without enough arguments", "tcpclient 0 0"),
    ("--- tcpclient prints error message with unknown port name", "tcpclient 0 nonexistentport echo wrong"),
    ("--- tcpclient prints error message when connection fails", "tcpclient 0 016 echo wrong"),
    ("--- tcpclient -q does not print error message when connection fails", "tcpclient -q 0 016 echo wrong"),
    ("--- tcpclient understands empty host name as synonym for 0", "tcpclient '' 016 echo wrong"),
    ("--- tcpclient understands unbracketed IP address", "tcpclient 127.000.000.001 016 echo wrong"),
    ("--- tcpclient understands bracketed IP address", "tcpclient '[127.000.000.001]' 016 echo wrong"),
    ("--- tcpclient prints error message with unknown host name", "tcpclient nonexistent.local. 016 echo wrong"),
    (
        "--- tcpclient prints error message with unresolvable host name",
        "tcpclient thislabelistoolongbecausednshasalimitof63charactersinasinglelabel. 016 echo wrong",
    ),
    (
        "--- tcpserver sets basic environment variables",
        "tcpclient -p 50017 -R -H -T 10 -l Local 0 50016 sh -c 'cat <&6'",
    ),
    (
        "--- tcpclient recognizes -D, -i, -r, -h, -t",
        "tcpclient -Di 127.0.0.1 -p 50018 -hrt1 -l Local 127.0.0.1 50016 sh -c 'cat <&6'",
    ),
    ("--- tcpclient sets basic environment variables", "tcpclient -p 50019 -R -H -l Local 0 50016 ./print"),
    ("--- tcpclient looks up host names properly", "tcpclient -p 50020 -R -l Local 0 50016 ./print"),
    ("--- tcpclient -v works", "tcpclient -v -R -H -l Local 0 50016 echo ok"),
]

SERVER_OPTIONS = ["-c", "2", "-Bbanner", "-vo", "-D", "-Xx", "rules.cdb", "-Rt5", "-hp", "-l", "Local", "-b", "2"]


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1, below the ephemeral range: the kernel hands none of them out meanwhile."""
    chosen: list[int] = []
    candidates = random.Random().sample(range(20000, 32000), 200)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError("no free ports below the ephemeral range")


def _port_name(number: bytes, names: dict[str, str]) -> bytes:
    return names.get(number.decode(), number.decode()).encode()


def run_script(tcpclient: Path, tcpserver: Path) -> bytes:
    """The whole tcpclient section's output with these two commands, ports written back."""
    loopback = fresh_loopback()
    with (
        tempfile.TemporaryDirectory(prefix="rts-tcpclient-") as work,
        FakeDNS(loopback, ptr={"127.0.0.1": "localhost."}, a={"localhost.": ["127.0.0.1"]}),
    ):
        directory = Path(work)
        commands = directory / "bin"
        commands.mkdir()
        (commands / "tcpclient").symlink_to(tcpclient)
        print_script = directory / "print"
        print_script.write_text(PRINT)
        print_script.chmod(0o755)
        environment = {"PATH": f"{commands}:/usr/bin:/bin", "DNSCACHEIP": loopback}
        server_environment = [f"{name}={value}".encode() for name, value in environment.items()]
        with start_server(
            tcpserver, SERVER_OPTIONS, [str(print_script)], environment=server_environment, cwd=directory
        ) as server:
            client_ports = _free_ports(len(CLIENT_PORT_NAMES))
            names = dict(zip(map(str, client_ports), CLIENT_PORT_NAMES, strict=True))
            names[str(server.port)] = SERVER_PORT_NAME
            numbers = {name: number for number, name in names.items()}
            output = bytearray()
            for heading, command in SCRIPT:
                output += heading.encode() + b"\n"
                real = re.sub(r"\b(5001[6-9]|50020)\b", lambda match: numbers[match.group(1)], command)
                result = subprocess.run(
                    ["sh", "-c", real + " 2>&1; echo $?"],
                    cwd=directory,
                    env=environment,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
                output += re.sub(rb"\b\d+\b", lambda match: _port_name(match.group(), names), result.stdout)
    return bytes(output)


def test_ours_produce_the_expected_output() -> None:
    assert run_script(OURS, OUR_SERVER.command).decode() == EXPECTED.read_text()


@pytest.mark.skipif(not original_available(), reason="Debian's tcpclient is not installed here")
def test_the_original_still_produces_it() -> None:
    assert run_script(ORIGINAL, ORIGINAL_SERVER.command).decode() == EXPECTED.read_text()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-expected"]:
        raise SystemExit(f"usage: {sys.argv[0]} --write-expected")
    EXPECTED.write_bytes(run_script(ORIGINAL, ORIGINAL_SERVER.command))
    os.write(1, EXPECTED.read_bytes())
