"""The rules parser in-process: docs/behaviour.md §3.2-3.4 and the quirks of docs/behaviour.md §9, then two properties.

Expected values come from the spec's [V] facts about the original, not from our code.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import cdbx
import pytest
from conftest import UNIT, raw_rule_files, rule_files, without_extended_syntax
from hypothesis import example, given
from hypothesis import strategies as st

from ucspi.errors import EXIT_PERMANENT, Fatal
from ucspi.rules.compile import compile_rules
from ucspi.rules.syntax import RuleSyntaxError, add_records, address_keys, instruction_data, rule_records

Records = list[tuple[bytes, bytes]]


def records(text: bytes) -> Records:
    return list(rule_records([text]))


def outcome(blocks: Iterable[bytes]) -> tuple[Records, bytes | None]:
    """The records read before the end or the first bad line, and that line (None if none)."""
    found: Records = []
    try:
        for record in rule_records(blocks):
            found.append(record)
    except RuleSyntaxError as error:
        return found, error.line
    return found, None


def added(blocks: Iterable[bytes]) -> tuple[Records, bytes | None]:
    """outcome() through add_records, the callback form compile_rules uses."""
    found: Records = []
    try:
        add_records(blocks, lambda key, data: found.append((key, data)))
    except RuleSyntaxError as error:
        return found, error.line
    return found, None


def bad_line(text: bytes) -> bytes:
    with pytest.raises(RuleSyntaxError) as raised:
        records(text)
    return raised.value.line


def ip_keys(prefix: bytes, numbers: Iterable[int], suffix: bytes = b"") -> list[bytes]:
    return [b"%s%d%s" % (prefix, number, suffix) for number in numbers]


# ---- docs/behaviour.md §3.4: the range table, row by row (and the two range rows of 3.3) ----

RANGES: list[tuple[bytes, list[bytes]]] = [
    (b"1.2.3.250-300", ip_keys(b"1.2.3.", range(250, 256))),
    (b"1.2.3.4-4294967297", ip_keys(b"1.2.3.", range(4, 256))),
    (b"1.2.3.300-400", []),
    (b"1.2.3.5-3", []),
    (b"1.2.3.4-", []),
    (b"1.2.3.-2", [b"1.2.3.0", b"1.2.3.1", b"1.2.3.2"]),
    (b"1.2.3.01-03", [b"1.2.3.1", b"1.2.3.2", b"1.2.3.3"]),
    (b"1-3", [b"1", b"2", b"3"]),
    (b"-", [b"0"]),
    (b"1-2.3-4.", [b"1.3-4.", b"2.3-4."]),
    (b"1.2-3.4.5", [b"1.2.4.5", b"1.3.4.5"]),
    (b"=a-b.com", [b"=a-b.com"]),
    (b"x@1.2.3.4-5", [b"x@1.2.3.4-5"]),
    (b"1.2.3.37-40", ip_keys(b"1.2.3.", range(37, 41))),
    (b"10.2-3.", [b"10.2.", b"10.3."]),
    (b"1.2.3.37-39", [b"1.2.3.37", b"1.2.3.38", b"1.2.3.39"]),  # example 4
]
# "Anything else (space, `+`, second `-`, letters) -> parse error" (docs/behaviour.md §3.4).
BAD_RANGES = [b"1.2.3.4--5", b"abc-def", b"1.2.3.x-3", b"1.2.3. 4-5", b"1.2.3.4- 5", b"1.2.3.+4-5", b"1.2.3.4-5a"]


@pytest.mark.parametrize(("address", "keys"), RANGES)
def test_range_table(address: bytes, keys: list[bytes]) -> None:
    line = address + b":deny"
    assert address_keys(address, line) == keys
    # Every key of a range carries the same data, in increasing order (docs/behaviour.md §3.4).
    assert records(line + b"\n") == [(key, b"D\x00") for key in keys]


@pytest.mark.parametrize("address", BAD_RANGES)
def test_bad_range_is_a_parse_error_naming_the_line(address: bytes) -> None:
    line = address + b":allow"
    with pytest.raises(RuleSyntaxError) as raised:
        address_keys(address, line)
    assert raised.value.line == line
    assert bad_line(line + b"  \n") == line


def test_empty_range_writes_nothing_and_is_no_error() -> None:
    assert records(b"1.2.3.5-3:deny\n1.2.3.4:allow\n") == [(b"1.2.3.4", b"")]


# Found by make fuzz: int() refuses over 4,300 digits. The original's scan_ulong wraps at 2**64
# whatever the length (checked against /usr/bin/tcprules with these very numbers). 10**64 is a
# multiple of 2**64, so 1 then N zeros then 250 is 250 modulo 2**64 for any N >= 64.
@pytest.mark.parametrize(
    ("address", "keys"),
    [
        (b"1.2.3.1" + b"0" * 4400 + b"250-252", ip_keys(b"1.2.3.", range(250, 253))),
        (b"1.2.3.1-1" + b"0" * 4400 + b"003", ip_keys(b"1.2.3.", range(1, 4))),
        (b"1.2.3.1-1" + b"0" * 100_000 + b"3", ip_keys(b"1.2.3.", range(1, 4))),
        (b"1.2.3.0-" + b"9" * 8190, ip_keys(b"1.2.3.", range(256))),
    ],
    ids=["bottom", "top", "100k-digits", "8k-nines"],
)
def test_range_numbers_of_any_length_wrap_at_2_to_the_64(address: bytes, keys: list[bytes]) -> None:
    assert records(address + b":allow\n") == [(key, b"") for key in keys]


# ---- docs/behaviour.md §3.3: every other address form is its key, verbatim ----


@pytest.mark.parametrize(
    "address",
    [b"1.2.3.4", b"1.2.3.", b"10.", b"", b"=host.example.com", b"=.example.com", b"=", b"joe@1.2.3.4",
     b"joe@=host.x", b"001.2.3.4", b"joe@1.2.3.", b"=Host.Example.COM", b"1.2\x003.4", b"\xff\x80"],
)
def test_address_is_the_key_verbatim(address: bytes) -> None:
    assert address_keys(address, address + b":allow") == [address]
    assert records(address + b":allow\n") == [(address, b"")]


# ---- docs/behaviour.md §2.4 and 3.5: the data of an instruction ----


@pytest.mark.parametrize(
    ("instruction", "data"),
    [
        (b"allow", b""),  # allow has no marker byte
        (b"deny", b"D\x00"),
        (b'deny,X="y"', b"D\x00+X=y\x00"),
        (b'allow,RELAYCLIENT="",TCPLOCALHOST="movie.edu"', b"+RELAYCLIENT=\x00+TCPLOCALHOST=movie.edu\x00"),
        (b"allow,RELAYCLIENT=/@fix.me/", b"+RELAYCLIENT=@fix.me\x00"),
        (b'allow,FOO=xabcx,BAR=""', b"+FOO=abc\x00+BAR=\x00"),
        (b'allow,FOO="  spaced  "', b"+FOO=  spaced  \x00"),
        (b"allow,which=/known/", b"+which=known\x00"),
        # The name runs to the next '=' anywhere, commas included; it may be empty (docs/behaviour.md §9.5).
        (b'allow,FOO,BAR="x"', b"+FOO,BAR=x\x00"),
        (b'allow,="x"', b"+=x\x00"),
        # The delimiter is any byte: space, '/', '+', '=', NUL, CR (docs/behaviour.md §3.2 step 6).
        (b'allow,X= a ,Y="b"', b"+X=a\x00+Y=b\x00"),
        (b"allow,X=+a+", b"+X=a\x00"),
        (b"allow,X==a=", b"+X=a\x00"),
        (b"allow,X=\x00a\x00", b"+X=a\x00"),
        (b"allow,X=\ra\r", b"+X=a\x00"),
        (b"allow,X=::", b"+X=\x00"),
        # The value may hold ',', '=' and ':'.
        (b'allow,X="a,b=c:d"', b"+X=a,b=c:d\x00"),
        (b"allow,X=:a,b:", b"+X=a,b\x00"),
    ],
)
def test_instruction_data(instruction: bytes, data: bytes) -> None:
    line = b"1.2.3.4:" + instruction
    assert instruction_data(instruction, line) == data
    assert records(line + b"\n") == [(b"1.2.3.4", data)]


@pytest.mark.parametrize(
    "instruction",
    [
        b"", b"Allow", b"DENY", b"den", b"allo", b"allowx", b"allow x", b" allow", b"allow, X", b"allow,",
        b"deny,", b"allow,FOO", b"allow,X=", b'allow,X="abc', b'allow,X="a"b', b'allow,X="a",', b'allow,X="a" ,Y=""',
        b"allow:deny", b"allow\r", b"allow,Q=/x/y",
    ],
)
def test_bad_instruction(instruction: bytes) -> None:
    line = b"1.2.3.4:" + instruction
    with pytest.raises(RuleSyntaxError) as raised:
        instruction_data(instruction, line)
    assert raised.value.line == line
    assert bad_line(line + b"\n") == line


# ---- docs/behaviour.md §3.2 and 9: lines ----


def test_comment_only_in_column_one() -> None:
    assert records(b"#1.2.3.4:allow\n") == []
    assert records(b"  # x:allow\n") == [(b"  # x", b"")]
    assert records(b"#:bad\n") == []  # a comment is never parsed


def test_blank_whitespace_and_colonless_lines_are_skipped() -> None:
    text = b"\n \n\t\n \t \n1.2.3.4 allow\nno colon here, not even after=\n\r\n"
    assert records(text) == []


def test_leading_whitespace_is_part_of_the_key() -> None:
    assert records(b"  1.2.3.4:allow\n") == [(b"  1.2.3.4", b"")]
    assert records(b"\t1.2.3.4:allow\n") == [(b"\t1.2.3.4", b"")]


def test_space_before_colon_is_part_of_the_key_and_after_colon_is_an_error() -> None:
    assert records(b"1.2.3.4 :allow\n") == [(b"1.2.3.4 ", b"")]
    assert bad_line(b"1.2.3.4: allow\n") == b"1.2.3.4: allow"


def test_trailing_spaces_and_tabs_are_stripped_but_not_cr() -> None:
    assert records(b"1.2.3.4:allow \t \n") == [(b"1.2.3.4", b"")]
    assert records(b'1.2.3.4:allow,FOO="  spaced  "  \n') == [(b"1.2.3.4", b"+FOO=  spaced  \x00")]
    # A CRLF file fails on its first rule, and the message keeps the CR (docs/behaviour.md §9.4).
    assert bad_line(b"1.2.3.4:allow\r\n") == b"1.2.3.4:allow\r"
    assert bad_line(b'1.2.3.4:allow,X="y"\r\n') == b'1.2.3.4:allow,X="y"\r'
    # The line in the error is the stripped one.
    assert bad_line(b"1.2.3.4:allow, \t \n") == b"1.2.3.4:allow,"


def test_only_the_first_colon_splits() -> None:
    assert bad_line(b"a:b:allow\n") == b"a:b:allow"
    assert records(b'1.2.3.4:allow,X=":x:"\n') == [(b"1.2.3.4", b"+X=:x:\x00")]


def test_empty_address_is_the_default_rule() -> None:
    assert records(b":deny\n") == [(b"", b"D\x00")]
    assert records(b":allow,which=/anybody/\n") == [(b"", b"+which=anybody\x00")]


def test_final_line_without_newline_is_a_line() -> None:
    assert records(b"1.2.3.4:allow\n5.6.7.8:deny") == [(b"1.2.3.4", b""), (b"5.6.7.8", b"D\x00")]
    assert bad_line(b"1.2.3.4:allow\n5.6.7.8:bad") == b"5.6.7.8:bad"


def test_nul_stays_in_the_key() -> None:
    assert records(b"1.2\x003.4:allow\n") == [(b"1.2\x003.4", b"")]
    # The error keeps the whole line; the message cuts it at the NUL (compile, below).
    assert bad_line(b"1.2\x003.4:bad\n") == b"1.2\x003.4:bad"


def test_duplicate_keys_are_all_kept_in_order() -> None:
    text = b'1.2.3.4:allow,A="1"\n1.2.3.4:deny\n'
    assert records(text) == [(b"1.2.3.4", b"+A=1\x00"), (b"1.2.3.4", b"D\x00")]


def test_records_before_the_first_bad_line_then_the_error() -> None:
    found, line = outcome([b"1.2.3.4:allow\n1.2.3.5:Allow\n1.2.3.6:deny\n"])
    assert found == [(b"1.2.3.4", b"")]
    assert line == b"1.2.3.5:Allow"


def test_example_5() -> None:
    text = b"# comment\n\n=.abuser.edu:deny\n=known.edu:allow,which=/known/\n:allow,which=/anybody/\n"
    assert records(text) == [
        (b"=.abuser.edu", b"D\x00"),
        (b"=known.edu", b"+which=known\x00"),
        (b"", b"+which=anybody\x00"),
    ]


def test_empty_block_in_the_middle_is_not_the_end_of_input() -> None:
    """rule_records takes "blocks of any size"; an empty one must not end the pending line.

    Regression: the first parser took b"" for the end of input and parsed `1.2.3.4:al` as a line.
    """
    assert outcome([b"1.2.3.4:al", b"", b"low\n"]) == ([(b"1.2.3.4", b"")], None)


# ---- compile_rules in-process: what the parse error prints, and what is left behind ----


def compile_text(directory: Path, text: bytes) -> None:
    source = directory / "rules.txt"
    source.write_bytes(text)
    input_fd = os.open(source, os.O_RDONLY)
    try:
        compile_rules(input_fd, os.fsencode(directory / "rules.cdb"), os.fsencode(directory / "rules.tmp"))
    finally:
        os.close(input_fd)


def test_parse_error_message_is_cut_at_nul_and_tmp_is_left(tmp_path: Path) -> None:
    with pytest.raises(Fatal) as raised:
        compile_text(tmp_path, b"1.2.3.4:allow\n1.2\x003.4:bad\n")
    assert raised.value.message == b"tcprules: fatal: unable to parse this line: 1.2"
    assert raised.value.exit_code == EXIT_PERMANENT
    assert not (tmp_path / "rules.cdb").exists()
    assert (tmp_path / "rules.tmp").exists()


def test_parse_error_leaves_an_existing_cdb_untouched(tmp_path: Path) -> None:
    (tmp_path / "rules.cdb").write_bytes(b"the old rules")
    with pytest.raises(Fatal):
        compile_text(tmp_path, b"1.2.3.4:allow\n1.2.3.4:allow,\n")
    assert (tmp_path / "rules.cdb").read_bytes() == b"the old rules"


def test_empty_input_is_a_2048_byte_cdb(tmp_path: Path) -> None:
    compile_text(tmp_path, b"")
    empty_bucket = (2048).to_bytes(4, "little") + (0).to_bytes(4, "little")
    assert (tmp_path / "rules.cdb").read_bytes() == empty_bucket * 256
    assert not (tmp_path / "rules.tmp").exists()


# ---- properties ----


def reference_outcome(text: bytes) -> tuple[Records, bytes | None]:
    """Spec 3.2-3.4 step by step, one line at a time: the slow, obvious oracle for the parser."""
    found: Records = []
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the text ended with "\n": no final partial line
    for raw in lines:
        if raw[:1] in (b"", b"#"):
            continue
        line = raw.rstrip(b" \t")
        address, colon, rest = line.partition(b":")
        if not colon:
            continue
        if rest.startswith(b"deny"):
            data, rest = b"D\x00", rest[4:]
        elif rest.startswith(b"allow"):
            data, rest = b"", rest[5:]
        else:
            return found, line
        while rest:
            name, equals, rest = rest.partition(b"=")
            if name[:1] != b"," or not equals or not rest:
                return found, line
            value, closing, rest = rest[1:].partition(rest[:1])
            if not closing:
                return found, line
            data += b"+" + name[1:] + b"=" + value + b"\x00"
        dash = address.find(b"-")
        if dash < 0 or b"=" in address or b"@" in address:
            found.append((address, data))
            continue
        left = address.rfind(b".", 0, dash) + 1
        right = address.find(b".", dash + 1) % (len(address) + 1)  # -1 -> end of address
        numbers = []
        for part in (address[left:dash], address[dash + 1 : right]):
            digits = part.split(b"\x00")[0]  # a C string ends at NUL
            if not all(48 <= byte <= 57 for byte in digits):
                return found, line
            numbers.append(int(digits or b"0") % 2**64)
        for number in range(numbers[0], min(numbers[1], 255) + 1):
            found.append((address[:left] + str(number).encode() + address[right:], data))
    return found, None


@UNIT
@example(b"18446744073709551617-3:allow\n")  # scan_ulong wraps at 2**64: bottom 1
@example(b"1.2.3.0-18446744073709551616:deny\n")  # top wraps to 0
@example(b"1\x00x-3:allow\n")  # the number is a C string: it ends at the NUL
@example(b"#x\n\n  \n=a-b:allow \n1.2.3.4:allow\r\n")
@given(st.one_of(rule_files(valid_only=True), rule_files(valid_only=False), raw_rule_files()))
def test_parser_agrees_with_the_step_by_step_reading(text: bytes) -> None:
    text = without_extended_syntax(text)  # IPv6 and CIDR lines: test_cidr.py
    assert outcome([text]) == reference_outcome(text)




@st.composite
def split_into_blocks(draw: st.DrawFn, text: bytes) -> list[bytes]:
    """The text cut at arbitrary points into non-empty blocks (os.read never returns b"" early)."""
    cuts = sorted(draw(st.sets(st.integers(1, max(len(text) - 1, 1)), max_size=12)))
    edges = [0, *[cut for cut in cuts if cut < len(text)], len(text)]
    return [text[start:end] for start, end in itertools.pairwise(edges) if end > start]


@UNIT
@given(st.data(), st.one_of(rule_files(valid_only=False), raw_rule_files()))
def test_records_do_not_depend_on_block_sizes(data: st.DataObject, text: bytes) -> None:
    blocks = data.draw(split_into_blocks(text))
    assert b"".join(blocks) == text
    assert outcome(blocks) == outcome([text])
    assert added(blocks) == outcome([text])
    # One byte at a time is the most demanding split.
    assert outcome([bytes([byte]) for byte in text]) == outcome([text])


@UNIT
@given(rule_files(valid_only=True))
def test_compiled_cdb_holds_exactly_the_parsed_records(text: bytes) -> None:
    expected = records(text)
    # tmp_path is function-scoped, which hypothesis refuses; one directory per example instead.
    with tempfile.TemporaryDirectory() as directory:
        compile_text(Path(directory), text)
        rules = cdbx.CDB(os.path.join(directory, "rules.cdb"))
        try:
            assert list(rules.items(all=True)) == expected
            for key, _ in expected:
                assert rules.get(key, all=True) == [data for other, data in expected if other == key]
        finally:
            rules.close()
