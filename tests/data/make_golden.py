#!/usr/bin/env python3
"""Regenerate tests/data/golden/ from the ORIGINAL tcprules (Debian ucspi-tcp 1:0.88-7).

For every case in CASES this writes NAME.rules (the input), runs `/usr/bin/tcprules rules.cdb
rules.tmp < NAME.rules` in a fresh scratch directory and stores what the original produced:
NAME.exit (exit code and a newline), NAME.stderr (raw bytes) and NAME.cdb (only when it exited 0).
Rerunnable: the golden directory is rewritten from scratch. Inputs live in this table, not in
hand-edited files, so the binary ones (NUL, CR, invalid UTF-8) stay reproducible and reviewable.

Usage: python3 tests/data/make_golden.py [--tcprules /usr/bin/tcprules]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"
# The file names given to tcprules; tests/rules/test_golden.py runs ours with the same names.
CDB_NAME = "rules.cdb"
TMP_NAME = "rules.tmp"

# name -> (what it covers, rules text). Spec sections in brackets.
CASES: dict[str, tuple[str, bytes]] = {
    # The spec's examples 1-7 [3.5].
    "ex1_deny": ("example 1: one deny rule", b"18.23.0.32:deny\n"),
    "ex2_two_vars": (
        "example 2: two variables, one empty",
        b'127.0.0.1:allow,RELAYCLIENT="",TCPLOCALHOST="movie.edu"\n',
    ),
    "ex3_prefix_slash": ("example 3: prefix, / as delimiter", b"10.0.:allow,RELAYCLIENT=/@fix.me/\n"),
    "ex4_range": ("example 4: range of three", b"1.2.3.37-39:deny\n"),
    "ex5_hosts": (
        "example 5: comment, blank line, host rules, empty address",
        b"# comment\n\n=.abuser.edu:deny\n=known.edu:allow,which=/known/\n:allow,which=/anybody/\n",
    ),
    "ex6_info_prefix": ("example 6: user@ip and deny with a variable", b'joe@127.0.0.1:allow\n127.:deny,X="y"\n'),
    "ex7_duplicate_key": ("example 7: duplicate key, both stored", b'1.2.3.4:allow,A="1"\n1.2.3.4:deny\n'),
    # Address forms [3.3].
    "exact_ip_allow": ("exact IP, allow without data", b"1.2.3.4:allow\n"),
    "dotted_prefixes": ("prefixes ending in a dot", b"1.2.3.:allow\n1.2.:deny\n10.:allow,P=/ten/\n"),
    "empty_address": ("empty address (default rule)", b":deny\n"),
    "hosts_exact_suffix_any": (
        "=host, =.domain and = alone",
        b"=host.example.com:allow\n=.example.com:deny\n=:allow,ANYHOST=//\n",
    ),
    "user_at_forms": (
        "user@ip, user@=host, empty user, user@prefix (stored verbatim)",
        b"joe@1.2.3.4:allow\njoe@=host.x:deny\n@1.2.3.4:allow,E=/empty user/\njoe@1.2.3.:allow\n",
    ),
    "leading_zeros_literal": ("no normalisation of 001.2.3.4", b"001.2.3.4:allow\n"),
    "many_records": (
        "1024 records from four ranges (bigger tables)",
        b"".join(b"192.168.%d.0-255:deny\n" % n for n in range(4)),
    ),
    # Ranges [3.4]: every row of the table, plus NUL and 64-bit wraparound.
    "range_clamp_top": ("top clamped to 255", b"1.2.3.250-300:allow\n"),
    "range_huge_top": ("huge top accepted, clamped", b"1.2.3.4-4294967297:deny\n"),
    "range_wrap_bottom": ("bottom 2**64+5 wraps to 5", b"1.2.3.18446744073709551621-7:allow\n"),
    "range_wrap_top": ("top 2**64+3 wraps to 3", b"1.2.3.1-18446744073709551619:allow\n"),
    "range_above_255": ("both ends above 255: nothing written", b"1.2.3.300-400:deny\n"),
    "range_bottom_gt_top": ("bottom > top: nothing written, no error", b"1.2.3.5-3:deny\n"),
    "range_empty_top": ("empty top counts as 0", b"1.2.3.4-:deny\n"),
    "range_empty_bottom": ("empty bottom counts as 0", b"1.2.3.-2:allow\n"),
    "range_leading_zeros": ("numbers re-formatted", b"1.2.3.01-03:allow\n"),
    "range_no_dots": ("range without any dot", b"1-3:allow\n"),
    "range_dash_alone": ("- alone is key 0", b"-:allow\n"),
    "range_second_dash_literal": ("only the first dash expands", b"1-2.3-4.:allow\n"),
    "range_middle_octet": ("range in the middle", b"1.2-3.4.5:allow\n"),
    "range_prefix": ("range of prefixes", b"10.2-3.:deny\n"),
    "range_nul_in_parts": ("a NUL ends each number", b"1.2.3.4\x00junk-6:allow\n7.7.7.1-2\x00x:deny\n"),
    "range_double_dash_error": ("second dash right after the first", b"1.2.3.4--5:deny\n"),
    "range_letters_error": ("letters in a range", b"abc-def:deny\n"),
    "range_x_error": ("letter in the bottom", b"1.2.3.x-3:deny\n"),
    "range_space_error": ("space after the top (before the colon)", b"1.2.3.4-5 :deny\n"),
    "range_plus_error": ("+ in the top", b"1.2.3.4-+5:deny\n"),
    "range_literal_with_equals_at": ("no expansion with = or @", b"=a-b.com:deny\nx@1.2.3.4-5:allow\n"),
    # Instructions and variables [3.2].
    "var_delimiters": (
        "delimiters space, /, +, =, comma",
        b"1.2.3.4:allow,A= spaced ,B=/slash/,C=+plus+,D==eq=,E=,comma,\n",
    ),
    "var_value_specials": ("value holding , = : #", b'1.2.3.4:allow,X="a,b=c:d",Y=#h#\n'),
    "var_name_commas": ("name extends to the next =", b'1.2.3.4:allow,FOO,BAR="x"\n'),
    "var_empty_name": ("empty name", b'1.2.3.4:allow,="x"\n'),
    "deny_with_vars": ("deny marker first, then variables", b'1.2.3.4:deny,X="y",Y="z"\n'),
    "var_no_equals_error": (",FOO without =", b"1.2.3.4:allow,FOO\n"),
    "var_equals_at_end_error": ("= at the end of the line", b"1.2.3.4:allow,X=\n"),
    "var_unterminated_error": ("closing delimiter missing", b'1.2.3.4:allow,X="y\n'),
    "trailing_comma_error": ("a trailing comma alone", b'1.2.3.4:allow,X="y",\n'),
    "junk_after_delimiter_error": ("junk after a closing delimiter", b'1.2.3.4:allow,X="y"z\n'),
    "allow_capital_error": ("Allow is not allow", b"1.2.3.4:Allow\n"),
    "deny_upper_error": ("DENY is not deny", b"1.2.3.4:DENY\n"),
    "instruction_suffix_error": ("allowx: no comma after allow", b"1.2.3.4:allowx\n"),
    "double_colon_error": ("the first colon splits", b"1.2.3.4::allow\n"),
    "parse_error_after_good_lines": (
        "processing stops at the first bad line",
        b"1.2.3.4:allow\n5.6.7.8:deny\nbad:line\n9.9.9.9:allow\n",
    ),
    # Line handling [3.2, 9.3, 9.4].
    "comment_column1_only": (
        "only # in column 1 is a comment",
        b"# real comment\n  # not a comment:allow\n#1.2.3.4:deny\n",
    ),
    "only_comments": ("comments only: an empty cdb", b"# a\n#b:deny\n"),
    "blank_whitespace_lines": ("blank and whitespace-only lines skipped", b"\n   \n\t\n \t \n1.2.3.4:allow\n\n"),
    "no_colon_lines": ("lines without a colon skipped", b"1.2.3.4 deny\nthis is junk\n5.6.7.8:deny\n"),
    "trailing_space_tab": (
        "trailing spaces and tabs stripped, inner ones kept",
        b'1.2.3.4:allow,FOO="  spaced  "  \t \n9.9.9.9:deny\t\n',
    ),
    "leading_space_key": ("leading and inner spaces stay in the key", b"  1.2.3.4:allow\n1.2.3.4 :deny\n"),
    "crlf_error": ("CR is not stripped: parse error printing it", b"1.2.3.4:allow\r\n5.6.7.8:deny\r\n"),
    "crlf_blank_skipped": ("a lone CR line has no colon: skipped", b"\r\n1.2.3.4:deny\n"),
    "crlf_in_key": ("CR before the colon stays in the key", b"1.2.3.4\r:deny\n"),
    "nul_in_key": ("NUL kept in the key", b"1.2\x003.4:allow\n"),
    "nul_error": ("error message cut at the NUL", b"1.2\x003.4:bad\n"),
    "final_line_no_newline": ("last line without a newline", b"1.2.3.4:allow\n5.6.7.8:deny"),
    "final_line_no_newline_error": ("bad last line without a newline", b"1.2.3.4:allow\n5.6.7.8:nope"),
    "empty_input": ("no input at all: 2048-byte cdb", b""),
    "invalid_utf8": ("bytes that are not UTF-8", b"\xff\xfe.1.2:allow,X=/\xc3\x28/\n=h\xe9te.example:deny\n"),
    "invalid_utf8_error": ("an error line with invalid UTF-8", b"\xff:bad\xfe\n"),
    "long_line": (
        "100 kB key and 50 kB value",
        b"=" + b"a" * 100_000 + b":allow,X=/" + b"v" * 50_000 + b"/\n",
    ),
    "long_line_error": ("a 100 kB line printed in full", b"1.2.3.4:allow," + b"y" * 100_000 + b"\n"),
    # cdb format corner (docs/behaviour.md §2.2): djb hash 0, then a key probing the same slot.
    "hash_zero_key": ("key 39tcag8f has hash 0; aaami probes its slot", b"39tcag8f:allow,H=/zero/\naaami:deny\n"),
}


def run_original(tcprules: str, name: str, rules: bytes, scratch: Path) -> None:
    (GOLDEN / f"{name}.rules").write_bytes(rules)
    work = scratch / name
    work.mkdir()
    with open(GOLDEN / f"{name}.rules", "rb") as stdin:
        result = subprocess.run(
            [tcprules, CDB_NAME, TMP_NAME], stdin=stdin, cwd=work, capture_output=True, env={}, check=False
        )
    (GOLDEN / f"{name}.exit").write_text(f"{result.returncode}\n")
    (GOLDEN / f"{name}.stderr").write_bytes(result.stderr)
    if result.returncode == 0:
        shutil.copyfile(work / CDB_NAME, GOLDEN / f"{name}.cdb")
    elif (work / CDB_NAME).exists():
        sys.exit(f"{name}: the original failed yet wrote {CDB_NAME}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcprules", default="/usr/bin/tcprules")
    tcprules = parser.parse_args().tcprules
    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    GOLDEN.mkdir()
    with tempfile.TemporaryDirectory() as scratch:
        for name, (_, rules) in CASES.items():
            run_original(tcprules, name, rules, Path(scratch))
    failed = sum((GOLDEN / f"{name}.exit").read_text() != "0\n" for name in CASES)
    print(f"{len(CASES)} cases written to {GOLDEN} ({failed} exit non-zero)")


if __name__ == "__main__":
    main()
