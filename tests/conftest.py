"""Shared test helpers: where our commands and the original's are, and how to run them.

Test modules import these directly (`from conftest import ...`): pytest puts tests/ on sys.path
because tests/ has no __init__.py.
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def _internal_signals_to_default() -> None:
    """glibc's 32 and 33 at their default in every process the tests start.

    A parent that started us through glibc's posix_spawn (as some harnesses do) leaves them
    ignored, and an ignored signal outlives every exec: the original's child and ours then keep
    it ignored, rightly, and the tests that compare a program's signals with 0.88's plain start
    would measure the harness. glibc's sigaction refuses these two, hence the raw system call.
    """
    if sys.platform != "linux":
        return
    import ctypes
    import struct

    try:
        with open("/proc/self/status", "rb") as status:
            ignored = next(int(line.split()[1], 16) for line in status if line.startswith(b"SigIgn:"))
    except (OSError, StopIteration, ValueError):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    default = ctypes.create_string_buffer(struct.pack("<4Q", 0, 0, 0, 0))  # handler SIG_DFL, no flags
    for number in (32, 33):
        if ignored >> (number - 1) & 1:
            libc.syscall(13 if os.uname().machine == "x86_64" else 134, number, default, None, 8)


_internal_signals_to_default()

TOP = Path(__file__).resolve().parent.parent
OUR_BIN = TOP / "bin"
# Debian's ucspi-tcp 1:0.88-7, the reference every compat test compares with.
ORIGINAL_BIN = Path("/usr/bin")

# Hypothesis: no example database in the tree, no deadline (our commands are subprocesses whose
# start-up time varies with machine load). UCSPI_FUZZ_EXAMPLES raises the count for a long run.
# CI runs .ci/run, which installs every Debian tool the tests use: there a missing one fails.
IN_CI = os.environ.get("CI") == "true"


def needs_tool(command: str, package: str) -> pytest.MarkDecorator:
    """Skip where `command` is missing (saying which package brings it), except under CI=true:
    there the test runs, and fails on the missing tool."""
    missing = shutil.which(command) is None and not os.access(command, os.X_OK)
    return pytest.mark.skipif(missing and not IN_CI, reason=f"no {command} here (Debian: apt-get install {package})")


FUZZ_EXAMPLES = int(os.environ.get("UCSPI_FUZZ_EXAMPLES", "120"))
settings.register_profile(
    "ucspi-fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# In-process properties are cheap: more examples by default, scaled the same way.
settings.register_profile("ucspi-unit", parent=settings.get_profile("ucspi-fuzz"), max_examples=8 * FUZZ_EXAMPLES)
FUZZ = settings.get_profile("ucspi-fuzz")
UNIT = settings.get_profile("ucspi-unit")


def our_command(name: str) -> Path:
    """Our command run from the checkout (bin/NAME is the launcher)."""
    return OUR_BIN / name


def original_command(name: str) -> Path | None:
    """The original's command, or None when it is not installed here."""
    path = ORIGINAL_BIN / name
    return path if os.access(path, os.X_OK) else None


# uid of nobody and gid of nogroup on Debian
NOBODY = 65534
# The interpreter a copy for nobody runs under: the system's, readable by everyone.
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _as_nobody(argv: Sequence[str | os.PathLike[str]]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [os.fspath(part) for part in argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=command_environment(),
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        timeout=60,
        check=False,
    )


def _nobody_runs(launcher: Path) -> bool:
    """The launcher with no arguments, as nobody, gives its usage line and exit 100."""
    try:
        return _as_nobody([launcher]).returncode == 100
    except OSError:  # nobody cannot even reach it (a checkout under a 0700 directory)
        return False


def _distribution_closure(name: str) -> list[metadata.Distribution]:
    """ucspi's installed dependencies and theirs (test extras left out), as found in this venv."""
    found: dict[str, metadata.Distribution] = {}
    wanted = [requirement for requirement in metadata.requires(name) or [] if "extra ==" not in requirement]
    while wanted:
        dependency = re.split(r"[ ;<>=!~\[]", wanted.pop(), maxsplit=1)[0]
        key = dependency.lower().replace("_", "-")
        if key in found:
            continue
        found[key] = distribution = metadata.distribution(dependency)
        wanted += [requirement for requirement in distribution.requires or [] if "extra ==" not in requirement]
    return list(found.values())


def _copy_for_nobody(scratch: Path) -> Path:
    """ucspi and its dependencies copied into a venv of /usr/bin/python3 under scratch: bin/ of it."""
    prefix = scratch / "lib" / "ucspi"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", prefix], check=True, capture_output=True)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site_packages = prefix / "lib" / version / "site-packages"
    shutil.copytree(TOP / "ucspi", site_packages / "ucspi", ignore=shutil.ignore_patterns("__pycache__"))
    for distribution in _distribution_closure("ucspi"):
        for file in distribution.files or []:
            source = Path(distribution.locate_file(file))
            if ".." in file.parts or "__pycache__" in file.parts or not source.is_file():
                continue  # scripts outside site-packages, and bytecode nobody could rewrite anyway
            (site_packages / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, site_packages / file)
    # --version reads the version from the package's metadata, as installed.
    info = site_packages / f"ucspi-{metadata.version('ucspi')}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ucspi\nVersion: {metadata.version('ucspi')}\n")
    for launcher in ("tcprules", "tcprulescheck", "ucspi-launcher"):
        shutil.copy2(OUR_BIN / launcher, prefix / "bin" / launcher)
    for directory, _, files in os.walk(scratch):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)
    return prefix / "bin"


@functools.cache
def _bin_for_nobody() -> Path | str:
    """Where nobody can run our tcprules and tcprulescheck, or why nowhere (a skip reason)."""
    if os.geteuid() != 0:
        return "running a command as nobody needs root"
    if _nobody_runs(OUR_BIN / "tcprules"):
        return OUR_BIN  # this checkout and its Python are readable by everyone
    # A clone under a 0700 directory (/root, mktemp -d), or a Python only root can read.
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"nobody cannot reach this checkout or its Python, and there is no {SYSTEM_PYTHON} to copy it under"
    system_version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2], sep='.')"], capture_output=True, check=False
    ).stdout.decode().strip()
    our_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if system_version != our_version:
        return (
            f"nobody cannot reach this checkout or its Python, and {SYSTEM_PYTHON} is {system_version},"
            f" not {our_version}, the version the virtualenv's compiled dependencies are for"
        )
    scratch = Path(tempfile.mkdtemp(prefix="ucspi-for-nobody-", dir="/tmp"))
    atexit.register(shutil.rmtree, scratch, True)
    try:
        copy = _copy_for_nobody(scratch)
    except (OSError, subprocess.CalledProcessError) as error:
        return f"nobody cannot reach this checkout or its Python, and copying it for nobody failed: {error}"
    if not _nobody_runs(copy / "tcprules"):
        stderr = _as_nobody([copy / "tcprules"]).stderr[-500:]
        return f"a copy of our commands under {SYSTEM_PYTHON} does not run as nobody: {stderr!r}"
    return copy


def command_for_nobody(command: Path) -> Path:
    """The same command, somewhere nobody can run it: ours from a copy if need be (skips if none)."""
    if command.parent != OUR_BIN:
        return command  # the original's, under /usr/bin
    where = _bin_for_nobody()
    if isinstance(where, str):
        pytest.skip(where)
    return where / command.name


def _lowest_unprivileged_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _skip_without_privileged_ports() -> None:
    """Unprivileged, the fake DNS (53) and identd (113) cannot listen: their tests skip, saying so."""
    if os.geteuid() == 0 or _lowest_unprivileged_port() <= 53:
        return
    sys.path.insert(0, str(TOP / "tests" / "server"))
    import fakes  # tests/server/fakes.py; the tests import fresh_loopback from it later

    def fresh_loopback() -> str:
        pytest.skip("the fake DNS server (port 53) and identd (port 113) need root")

    fakes.fresh_loopback = fresh_loopback


_skip_without_privileged_ports()


def command_environment(variables: Mapping[bytes, bytes] | None = None) -> dict[bytes, bytes]:
    """A minimal environment: PATH only (the launcher needs it to find python3), plus variables."""
    environment = {b"PATH": os.environb.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin")}
    environment.update(variables or {})
    return environment


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    stdin: bytes = b"",
    *,
    cwd: str | os.PathLike[str] | None = None,
    environment: Mapping[bytes, bytes] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command with stdin bytes; capture stdout and stderr as bytes."""
    return subprocess.run(
        [os.fspath(part) for part in argv],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=command_environment() if environment is None else dict(environment),
        timeout=timeout,
        check=False,
    )


def djb_hash(data: bytes) -> int:
    """cdb's hash (docs/behaviour.md §2.2), written out here so tests do not trust the code they test."""
    h = 5381
    for byte in data:
        h = (((h << 5) + h) & 0xFFFFFFFF) ^ byte
    return h


# ---- Rules files for hypothesis (docs/behaviour.md §3.2-3.4) ----

# Octets a range or an IP may hold, edges included: over 255, leading zeros, around 2**32 and
# 2**64 (scan_ulong wraps at 64 bits), since the range rule clamps only the top (docs/behaviour.md §3.4).
_NUMBER_EDGES = [
    b"0", b"1", b"9", b"10", b"99", b"127", b"254", b"255", b"256", b"300", b"999",
    b"00", b"01", b"007", b"0255", b"4294967295", b"4294967296", b"4294967297",
    b"18446744073709551615", b"18446744073709551616", b"18446744073709551617", b"99999999999999999999999",
]
# Range parts tcprules rejects, and a NUL that scan_ulong stops at (kept out of valid files).
_BAD_NUMBERS = [b"x", b" 4", b"4 ", b"+4", b"-4", b"4-", b"0x10", b"\xb2", b"1\x00x", b"\x00"]


def octets() -> st.SearchStrategy[bytes]:
    return st.one_of(st.integers(0, 255).map(lambda number: b"%d" % number), st.sampled_from(_NUMBER_EDGES))


def ip_strings() -> st.SearchStrategy[bytes]:
    return st.lists(octets(), min_size=1, max_size=5).map(b".".join)


def _range_address(valid_only: bool) -> st.SearchStrategy[bytes]:
    number = st.one_of(st.just(b""), octets(), st.sampled_from(_NUMBER_EDGES))
    if not valid_only:
        number = st.one_of(number, number, number, st.sampled_from(_BAD_NUMBERS))
    # After the range a second "a-b" is literal text (docs/behaviour.md §3.4, `1-2.3-4.`).
    after = st.one_of(octets(), st.tuples(octets(), octets()).map(b"-".join))
    return st.builds(
        lambda before, bottom, top, tail, dot: b"".join(part + b"." for part in before)
        + bottom
        + b"-"
        + top
        + b"".join(b"." + part for part in tail)
        + (b"." if dot else b""),
        st.lists(octets(), max_size=3),
        number,
        number,
        st.lists(after, max_size=3),
        st.booleans(),
    )


def host_names() -> st.SearchStrategy[bytes]:
    label = st.one_of(
        st.text("abcxyz0129-_", max_size=6).map(str.encode),
        st.sampled_from([b"Example", b"COM", b"a\xe9b", b"a-b", b""]),
    )
    return st.lists(label, min_size=1, max_size=4).map(b".".join)


def user_names() -> st.SearchStrategy[bytes]:
    return st.one_of(st.text("joe.x-", max_size=5).map(str.encode), st.sampled_from([b"", b"Joe", b"a b"]))


def _verbatim_address(valid_only: bool) -> st.SearchStrategy[bytes]:
    """Any bytes but ':' and newline. A '/' makes a CIDR rule where it is in the IP part
    (README, differences item 5; such lines are dropped), not in a host form or in INFO."""
    alphabet = [b" ", b"\t", b"\r", b"\x00", b"\xff", b"\x80", b"#", b".", b",", b"=", b"@", b"a", b"1", b"-", b"/"]
    if valid_only:
        alphabet.remove(b"-")  # a '-' would make it a range, mostly an unparsable one
        alphabet.remove(b"/")  # valid for both: ours refuses `1/2` (not a network)
    return st.lists(st.sampled_from(alphabet), max_size=8).map(b"".join)


# Addresses with a ':' before a later `:allow`/`:deny`. The original rejects them all (its first
# colon is not followed by an instruction); ours must too, unless it is an IPv6 rule.
_COLON_ADDRESSES = [
    b"1.2.3.4:bogus", b"abc:def", b"2001:db8:1", b"::ffff:1.2.", b"a:b@1.2.3.4", b"=host:x", b" ::1", b"::1 ",
    b"fe80::1%eth0", b"1:2:3:4:5:6:7:8:9", b":", b"x:", b"1.2.3.4:", b"::1-3", b"2001:db8::1/129",
    # IPv6 rules (dropped from the comparison, but they go through the parser around the others)
    b"::1", b"2001:DB8::1", b"2001:db8:", b"joe@::1", b"10.0.0.0/8", b"2001:db8::/32",
]


def addresses(valid_only: bool = True) -> st.SearchStrategy[bytes]:
    """The address part of a rule: every form of docs/behaviour.md §3.3, ranges, and odd verbatim keys."""
    return st.one_of(
        ip_strings(),
        ip_strings().map(lambda ip: ip + b"."),
        _range_address(valid_only),
        st.just(b""),
        st.just(b"="),
        host_names().map(lambda host: b"=" + host),
        host_names().map(lambda host: b"=." + host),
        st.builds(lambda user, ip: user + b"@" + ip, user_names(), st.one_of(ip_strings(), _range_address(True))),
        st.builds(lambda user, host: user + b"@=" + host, user_names(), host_names()),
        st.builds(lambda spaces, ip: spaces + ip, st.sampled_from([b" ", b"  ", b"\t"]), ip_strings()),
        _verbatim_address(valid_only),
        # A '/' outside the IP part: 0.88's reading (README, differences item 5)
        host_names().map(lambda host: b"=" + host + b"/x"),
        st.builds(lambda user, ip: user + b"/@" + ip, user_names(), ip_strings()),
        *([] if valid_only else [st.sampled_from(_COLON_ADDRESSES)]),
    )


_NAMES = [b"RELAYCLIENT", b"TCPLOCALHOST", b"X", b"", b"A,B", b"FOO,BAR", b"a b", b"\xe9"]


@st.composite
def _variable(draw: st.DrawFn, last: bool) -> bytes:
    """`,NAME=dVALUEd`: the name stops at the first '=', d is any byte but newline (docs/behaviour.md §3.2)."""
    name = draw(st.one_of(st.sampled_from(_NAMES), st.binary(max_size=6)))
    name = name.replace(b"=", b"").replace(b"\n", b"")
    forbidden = {10}
    if last:
        forbidden |= {9, 32}  # tcprules strips a closing space or tab at the end of the line
    delimiter = draw(
        st.one_of(
            st.sampled_from([b'"', b"/", b"+", b"=", b",", b":", b" ", b"x", b"\x00", b"\r", b"\xff"]),
            st.integers(0, 255).map(lambda byte: bytes([byte])),
        )
    )
    if delimiter[0] in forbidden:
        delimiter = b'"'
    value = draw(st.one_of(st.sampled_from([b"", b"movie.edu", b"a,b=c:d", b"  spaced  "]), st.binary(max_size=8)))
    value = value.replace(delimiter, b"").replace(b"\n", b"")
    return b"," + name + b"=" + delimiter + value + delimiter


@st.composite
def instructions(draw: st.DrawFn) -> bytes:
    """`allow` or `deny`, then zero or more variables."""
    count = draw(st.integers(0, 3))
    variables = [draw(_variable(last=index == count - 1)) for index in range(count)]
    return draw(st.sampled_from([b"allow", b"deny"])) + b"".join(variables)


# Instructions tcprules rejects (docs/behaviour.md §3.2 steps 5-7, 9.4).
_BAD_INSTRUCTIONS = [
    b"", b"Allow", b"DENY", b"allo", b"allowx", b"allow x", b" allow", b"allow,", b"deny,FOO", b"allow,X=",
    b'allow,X="abc', b'allow,X="a"b', b'allow,X="a",', b"allow\r", b'deny,X="y"\r', b"allow:deny",
]


def _trailing_blanks() -> st.SearchStrategy[bytes]:
    return st.sampled_from([b"", b"", b" ", b"\t", b" \t  "])


def _rule_line(valid_only: bool) -> st.SearchStrategy[bytes]:
    instruction = instructions()
    if not valid_only:
        instruction = st.one_of(instruction, instruction, instruction, st.sampled_from(_BAD_INSTRUCTIONS))
    return st.builds(lambda a, i, t: a + b":" + i + t, addresses(valid_only), instruction, _trailing_blanks())


def _other_line() -> st.SearchStrategy[bytes]:
    """Lines tcprules skips: comments, blank and whitespace-only lines, lines without a colon."""
    free_text = st.binary(max_size=12).map(lambda text: text.replace(b"\n", b""))
    return st.one_of(
        free_text.map(lambda text: b"#" + text),
        st.sampled_from([b"", b" ", b"\t", b" \t ", b"\r"]),
        free_text.map(lambda text: text.replace(b":", b"")),
    )


def rule_files(valid_only: bool = True) -> st.SearchStrategy[bytes]:
    """A rules file from the grammar; with valid_only=False some lines are ones tcprules rejects."""
    line = st.one_of(_rule_line(valid_only), _rule_line(valid_only), _rule_line(valid_only), _other_line())
    return st.builds(
        lambda lines, newline: b"\n".join(lines) + (b"\n" if newline and lines else b""),
        st.lists(line, max_size=8),
        st.booleans(),  # a final line without a newline is still a line (docs/behaviour.md §3.2)
    )


# Raw bytes, biased toward the characters the syntax cares about.
_RAW_TOKENS = [
    b":", b",", b"=", b"-", b".", b"@", b"#", b"\n", b"\r", b"\t", b" ", b"\x00", b'"', b"/",
    b"0", b"1", b"2", b"5", b"9", b"25", b"255", b"256", b"\x80", b"\xff", b"\xe9", b"a", b"D", b"+",
    b"allow", b"deny", b":allow", b":deny", b',X="', b"1.2.3.", b"=a.b",
    b"::", b"2001:db8", b"/8", b"/33", b"::ffff:", b"10./", b"fe80::/10",
]


def raw_rule_files() -> st.SearchStrategy[bytes]:
    """Raw bytes; half the lines get an `:allow`/`:deny` in the middle so that some compile."""
    raw = st.lists(st.one_of(st.sampled_from(_RAW_TOKENS), st.binary(min_size=1, max_size=1)), max_size=12).map(
        b"".join
    )
    line = st.one_of(raw, st.builds(lambda a, i, t: a + i + t, raw, st.sampled_from([b":allow", b":deny"]), raw))
    return st.one_of(raw, st.lists(line, max_size=6).map(b"\n".join))


# README, differences item 5: our extended syntax takes the first ':' followed by allow/deny and then ','
# or the end of the line. Where what is before it holds a ':' and is an IPv6 address or prefix
# (as Python's ipaddress reads it, independently of ours), or holds a '/' in the IP part (after
# the last '@', no '='), the line is an IPv6 or CIDR rule and the original is not the reference.
# Every other line, a ':' in the address included, must give the original's result.
_EXTENDED_INSTRUCTION = re.compile(rb":(?:allow|deny)(?:,|\Z)")


def _is_ipv6(text: bytes) -> bool:
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return b"%" not in text


def _is_ipv6_prefix(text: bytes) -> bool:
    """A colon-terminated prefix of some IPv6 address, cut after a whole group."""
    return text.endswith(b":") and text != b":" and (_is_ipv6(text + b":") or _is_ipv6(text + b"0"))


def extended_syntax_may_apply(line: bytes) -> bool:
    if not line or line[:1] == b"#":
        return False
    line = line.rstrip(b" \t")
    found = _EXTENDED_INSTRUCTION.search(line)
    if found is None:
        return False
    address = line[: found.start()]
    if b"=" in address:
        return False
    ip = address.rpartition(b"@")[2]
    return b"/" in ip or _is_ipv6(ip) or _is_ipv6_prefix(ip)


def without_extended_syntax(text: bytes) -> bytes:
    """The rules text minus the lines README, differences item 5 lets us read differently."""
    return b"\n".join(line for line in text.split(b"\n") if not extended_syntax_may_apply(line))
