"""Tests for tinypile (regmix.data.tinypile): extractors on inline inputs, plus one real (network) build."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import re
import struct
import subprocess
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from regmix.data.tinypile import sources
from regmix.data.tinypile.builder import (
    MIN_DOMAIN_BYTES,
    TINY_SHARE,
    _jsonl_line,
    build_domain,
    build_tinypile,
    corpus_yaml,
    select_documents,
)
from regmix.data.tinypile.extractors import (
    bible_chapters,
    extract_chatterbot,
    extract_dictd,
    extract_fortunes,
)
from regmix.data.tinypile.formats import dictd_entries, read_rds, unlzw
from regmix.data.tinypile.markup import pod_to_text, roff_to_text, wikitext_to_text
from regmix.data.tinypile.mathgen import MATH_PROBLEMS, math_documents
from regmix.data.tinypile.sources import DOMAINS, _apt_download, _pip_download, detect_license, fetch_packages
from regmix.data.tinypile.text import MAX_DOC_BYTES, MIN_DOC_BYTES, clean_text, pack, split_at

# ------------------------------------------------------------------------------------ roff


MAN_PAGE = r""".\" Copyright and licence comment: must not appear
.de XX
this macro body must not appear
..
.if n \{\
.ds nroff-only string
.\}
.TH LS 1 2023-01-01 "GNU coreutils" "User Commands"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.B ls
[\fIOPTION\fR]... [\fIFILE\fR]...
.SH DESCRIPTION
List information about the FILEs \(em the current directory by default.
Sort entries alphabetically.
.PP
Mandatory arguments are mandatory\(aqs too, see
.BR dir (1)
and
.BI "long ptrace(enum __ptrace_request " request ", pid_t " pid );
.TP
.B \-a, \-\-all
do not ignore entries starting with .
.IP \(bu 2
a bullet item
.nf
  keep   this
  layout
.fi
.TS
allbox;
l l.
Name\tValue
_
alpha\t1
.TE
Caf\('e and na\[:i]ve \[u00E9]t\['e]
"""


def test_roff_to_text_renders_readable_text() -> None:
    text = roff_to_text(MAN_PAGE)
    assert text.startswith("LS(1)\n\nNAME\nls - list directory contents")
    assert "SYNOPSIS\nls [OPTION]... [FILE]..." in text
    assert ("List information about the FILEs \u2014 the current directory by default. "
            "Sort entries alphabetically.") in text
    assert "see dir(1) and long ptrace(enum __ptrace_request request, pid_t pid);" in text
    assert "mandatory's" in text
    assert "\n-a, --all\ndo not ignore entries starting with ." in text
    assert "\u2022 a bullet item" in text
    assert "  keep   this\n  layout" in text
    assert "Name  Value\nalpha  1" in text
    assert "Café and naïve été" in text
    for junk in ("Copyright", "macro body", "nroff-only", "\\f", ".TP", ".B", "allbox", "\\-"):
        assert junk not in text


def test_roff_so_redirect_is_dropped() -> None:
    assert roff_to_text(".so man3/printf.3\n") == ""


# ------------------------------------------------------------------------------------ wikitext

WIKI = """{{Infobox person|name={{nowrap|Ada Lovelace}}|image=Ada.jpg}}
'''Augusta Ada King''' (10 December 1815&nbsp;– 27 November 1852) was an English \
[[mathematician]] and [[Writer|writer]].<ref name="a">{{cite book|title=X}}</ref> \
She worked on [[Charles Babbage]]'s ''Analytical Engine''.<ref name="b" />
<!-- hidden comment -->
[[File:Ada Lovelace portrait.jpg|thumb|Portrait by [[Alfred Edward Chalon|Chalon]]]]

== Early life ==
* Born in [[London]]
# Daughter of [[Lord Byron]] see [http://example.org/byron the poet's page]
{| class="wikitable"
| cell || cell
|}

== References ==
{{reflist}}
[[Category:1815 births]]
[[de:Ada Lovelace]]
"""


def test_wikitext_to_text_strips_markup() -> None:
    text = wikitext_to_text(WIKI)
    assert text.startswith("Augusta Ada King (10 December 1815 – 27 November 1852) was an "
                           "English mathematician and writer. She worked on Charles Babbage's "
                           "Analytical Engine.")
    assert "Early life\n- Born in London\n- Daughter of Lord Byron see the poet's page" in text
    for junk in ("{{", "}}", "[[", "]]", "<ref", "Infobox", "hidden", "Portrait", "cell",
                 "Category", "References", "de:", "'''", "&nbsp;", "http"):
        assert junk not in text


# ------------------------------------------------------------------------------------ POD

POD = """=head1 NAME

perlfoo - a B<bold> test of C<< $obj->method >> and L<perlfunc/open>

=over 4

=item *

First E<gt> second, see L<the docs|perldoc>.

=item B<--flag>

Flag text.

=back

=begin html

<p>not this</p>

=end html

    verbatim C<kept> as is

=cut
"""


def test_pod_to_text() -> None:
    text = pod_to_text(POD)
    assert text.startswith("NAME\n\nperlfoo - a bold test of $obj->method and perlfunc/open")
    assert "* First > second, see the docs." in text
    assert "--flag\n\nFlag text." in text
    assert "    verbatim C<kept> as is" in text
    assert "not this" not in text and "=over" not in text


# ------------------------------------------------------------------------------------ packing


def test_pack_splits_huge_and_merges_small_documents() -> None:
    paragraph = "word " * 100  # ~500 bytes
    huge = "\n\n".join([paragraph] * 300)  # ~150 KB
    small = [f"tiny fortune number {i}" for i in range(40)]
    docs = pack([huge, "", "   \n", *small])
    assert all(MIN_DOC_BYTES <= len(d.encode()) <= MAX_DOC_BYTES for d in docs)
    assert len(docs) >= 4
    words = " ".join(docs).split()
    assert words.count("word") == 300 * 100
    assert all(f"number {i}" in "\n".join(docs) for i in range(40))


def test_pack_handles_single_huge_line_and_drops_empty() -> None:
    docs = pack(["x" * 120_000, "", "\n\n"], max_bytes=50_000)
    assert [len(d) for d in docs] == [50_000, 50_000, 20_000]
    assert pack(["", "  ", "short"]) == []


def test_clean_text_and_split_at() -> None:
    assert clean_text("a \t\r\nb\x00c\n\n\n\n\nd  ") == "a\nbc\n\nd"
    parts = split_at("title\nCHAPTER I\none\nCHAPTER II\ntwo\n", r"CHAPTER [IVX]+\b")
    assert parts == ["title\n", "CHAPTER I\none\n", "CHAPTER II\ntwo\n"]


def test_jsonl_line_is_one_line_even_for_unicode_separators() -> None:
    text = "a\u2028b\x85c\u2029d\n\"e\" \u00e9\u0416"
    line = _jsonl_line(text)
    assert line.endswith(b"\n") and len(line.decode().splitlines()) == 1
    assert json.loads(line) == {"text": text} and "\u00e9\u0416" in line.decode()


def test_select_documents_caps_balances_and_is_deterministic() -> None:
    rng = random.Random(0)
    sources = [["a" * rng.randint(300, 3000) for _ in range(200)],
               ["b" * rng.randint(300, 3000) for _ in range(50)],
               ["c" * 500 for _ in range(3)]]
    chosen = select_documents(sources, 100_000, seed="s")
    assert chosen == select_documents(sources, 100_000, seed="s")
    sizes = {i: 0 for i in range(3)}
    for src, doc in chosen:
        sizes[src] += len(_jsonl_line(sources[src][doc]))
    assert 99_000 <= sum(sizes.values()) <= 100_000
    assert sizes[2] == 3 * len(_jsonl_line("c" * 500))  # small source fully used
    assert abs(sizes[0] - sizes[1]) < 5_000  # the others share the rest evenly
    assert len({doc for src, doc in chosen if src == 0}) == sum(1 for s, _ in chosen if s == 0)


# ------------------------------------------------------------------------------------ formats


def _lzw_compress_9bit(data: bytes) -> bytes:
    """Reference LZW encoder for short inputs (table stays below 512 codes: 9-bit codes)."""
    table = {bytes([i]): i for i in range(256)}
    codes, w = [], b""
    for byte in data:
        wc = w + bytes([byte])
        if wc in table:
            w = wc
        else:
            codes.append(table[w])
            table[wc] = len(table) + 1  # code 256 is CLEAR
            w = bytes([byte])
    codes.append(table[w])
    assert len(table) < 511
    bits = sum(code << (9 * i) for i, code in enumerate(codes))
    return bits.to_bytes((9 * len(codes) + 7) // 8, "little")


@pytest.mark.parametrize("data", [b"TOBEORNOTTOBEORTOBEORNOT", b"aaaaaaaaaaaaaaaaaaaa",
                                  b"abababababab the cat sat on the mat " * 3])
def test_unlzw_round_trip(data: bytes) -> None:
    assert unlzw(_lzw_compress_9bit(data)) == data


def test_unlzw_matches_gzip_on_a_compress_stream() -> None:
    """gzip can read .Z files: cross-check our decoder against its decoder."""
    payload = _lzw_compress_9bit(b"KwKwK wiki wiki wiki")
    result = subprocess.run(["gzip", "-dc"], input=b"\x1f\x9d\x90" + payload,
                            capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip("gzip cannot decode .Z here")
    assert unlzw(payload) == result.stdout == b"KwKwK wiki wiki wiki"


def test_bible_chapters_names_books_in_order() -> None:
    text = ("Holy Bible header line\nGe1:1 In the beginning.\nGe1:2 And the earth.\n"
            "Ge2:1 Thus the heavens.\nExo1:1 Now these are the names.\n")
    assert list(bible_chapters(text)) == [
        "Genesis 1\n\n1 In the beginning.\n2 And the earth.",
        "Genesis 2\n\n1 Thus the heavens.", "Exodus 1\n\n1 Now these are the names."]


def _r_item(kind: int, payload: bytes, attr: bool = False) -> bytes:
    return struct.pack(">i", kind | (512 if attr else 0)) + payload


def _r_chars(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">ii", 9, -1)
    raw = text.encode()
    return struct.pack(">ii", 9 | (1 << 15), len(raw)) + raw


def _r_strs(values: list[str | None], attr: bool = False) -> bytes:
    return _r_item(16, struct.pack(">i", len(values)) + b"".join(map(_r_chars, values)), attr)


def test_rds_reader_reads_character_vectors_and_named_lists() -> None:
    header = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300)
    assert read_rds(header + _r_strs(["EMMA", "", None, "Chapter 1"])) == [
        "EMMA", "", None, "Chapter 1"]
    names_attr = (struct.pack(">i", 2 | 1024) + struct.pack(">i", 1) + _r_chars("names")
                  + _r_strs(["a", "b"]) + struct.pack(">i", 254))
    named = _r_item(19, struct.pack(">i", 2) + _r_strs(["x"]) + _r_strs(["y", "z"]), attr=True)
    assert read_rds(gzip.compress(header + named + names_attr)) == {"a": ["x"],
                                                                      "b": ["y", "z"]}


def test_dictd_entries_and_extractor() -> None:
    filler = "A long definition line. " * 8
    data = f"00-database-info\nmeta\nalpha\n  first letter\nbeta\n  {filler}see {{alpha}}\n"
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def enc(n: int) -> str:
        return b64[n // 64] + b64[n % 64] if n >= 64 else b64[n]

    a, b = data.index("alpha"), data.index("beta")
    index = (f"00-database-info\t{enc(0)}\t{enc(a)}\nalpha\t{enc(a)}\t{enc(b - a)}\n"
             f"beta\t{enc(b)}\t{enc(len(data) - b)}\nb\t{enc(b)}\t{enc(len(data) - b)}\n")
    assert dictd_entries(index, data) == ["alpha\n  first letter\n",
                                             f"beta\n  {filler}see {{alpha}}\n"]
    files = {"usr/share/dictd/x.index": index.encode(),
             "usr/share/dictd/x.dict.dz": gzip.compress(data.encode())}
    (doc,) = extract_dictd(files)
    assert doc == f"alpha\n  first letter\n\nbeta\n  {filler}see alpha"


def test_extract_fortunes_groups_and_skips_offensive() -> None:
    fortunes = "".join(f"Fortune number {i} is a reasonably long saying.\n%\n" for i in range(200))
    files = {"usr/share/games/fortunes/wisdom": fortunes.encode(),
             "usr/share/games/fortunes/wisdom.dat": b"\x00\x00binary",
             "usr/share/games/fortunes/off/rude": b"rude one\n%\nrude two\n%\n"}
    docs = list(extract_fortunes(files))
    assert len(docs) >= 2 and all("rude" not in d and "%" not in d for d in docs)
    assert sum(d.count("Fortune number") for d in docs) == 200


def test_extract_chatterbot_turns() -> None:
    yml = "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi there\n  - How are you?\n"
    (doc,) = extract_chatterbot({"x/english/greetings.yml": yml.encode()})
    assert doc == "Topic: greetings\n\nA: Hello\nB: Hi there\nA: How are you?"


def test_detect_license() -> None:
    dep5 = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
            "Files: debian/*\nLicense: GPL-2+\n\nFiles: *\nCopyright: x\nLicense: MIT\n")
    assert detect_license(dep5, "deb") == "MIT"
    assert detect_license(dep5.replace("MIT", "A and B and C and D"), "deb") == "A and B and others"
    assert detect_license("This is in the public domain.", "deb") == "public-domain"
    assert detect_license("Name: x\nLicense: BSD-3-Clause\n", "pypi") == "BSD-3-Clause"
    meta = "Name: x\nClassifier: License :: OSI Approved :: BSD License\n"
    assert detect_license(meta, "pypi") == "BSD License"


# ------------------------------------------------------------------------------------ math


def _check_math(kind: str, question: str, answer: str) -> None:
    m = re.fullmatch
    if kind == "arithmetic__add_sub":
        assert eval(m(r"What is (.*)\?", question)[1]) == int(answer)
    elif kind == "arithmetic__mul_div":
        if question.startswith("Calculate"):
            assert eval(m(r"Calculate (.*)\.", question)[1]) == int(answer)
        else:
            a, b = map(int, m(r"Divide (-?\d+) by (-?\d+)\.", question).groups())
            assert Fraction(a, b) == int(answer)
    elif kind == "arithmetic__mixed":
        assert eval(m(r"Evaluate (.*)\.", question)[1]) == int(answer)
    elif kind == "algebra__linear_1d":
        lhs, rhs, var = m(r"Solve (.*) = (-?\d+) for (\w)\.", question).groups()
        assert eval(lhs, {var: int(answer)}) == int(rhs)
    elif kind == "algebra__linear_2d":
        l1, r1, l2, r2, var = m(r"Solve (.*) = (-?\d+), (.*) = (-?\d+) for (\w)\.",
                                question).groups()
        other = (set(re.findall(r"[a-z]", l1)) - {var}).pop()

        def at(expr: str, w: int) -> int:
            return eval(expr, {var: int(answer), other: w})

        w = Fraction(int(r1) - at(l1, 0), at(l1, 1) - at(l1, 0))
        assert w.denominator == 1 and at(l2, int(w)) == int(r2)
    elif kind == "polynomials__evaluate":
        var, poly, x = m(r"Let f\((\w)\) = (.*)\. What is f\((-?\d+)\)\?", question).groups()
        assert eval(poly, {var: int(x)}) == int(answer)
    elif kind == "numbers__gcd_lcm":
        a, b = map(int, re.findall(r"\d+", question))
        assert int(answer) == (math.gcd(a, b) if "greatest" in question else math.lcm(a, b))
    elif kind == "numbers__remainder":
        a, b = map(int, re.findall(r"\d+", question))
        assert int(answer) == a % b
    elif kind == "numbers__is_prime":
        n = int(re.findall(r"\d+", question)[0])
        assert answer == str(n > 1 and all(n % d for d in range(2, n)))
    elif kind == "calculus__differentiate":
        poly, var = m(r"Differentiate (.*) with respect to (\w)\.", question).groups()
        for x in (-2.5, 0.5, 3.0):
            h = 1e-5
            numeric = (eval(poly, {var: x + h}) - eval(poly, {var: x - h})) / (2 * h)
            assert math.isclose(numeric, eval(answer, {var: x}), rel_tol=1e-6, abs_tol=1e-4)
    elif kind == "polynomials__expand":
        expr, var = m(r"Expand (.*)\.", question)[1], re.findall(r"[a-z]", answer)[0]
        for x in range(-3, 4):
            assert eval(expr, {var: x}) == eval(answer, {var: x})
    elif kind == "arithmetic__fractions":
        p, q, op, r, s = m(r"What is (-?\d+)/(\d+) ([-+*]) (\d+)/(\d+)\? .*", question).groups()
        left, right = Fraction(int(p), int(q)), Fraction(int(r), int(s))
        expected = left + right if op == "+" else left - right if op == "-" else left * right
        assert Fraction(answer) == expected and str(expected) == answer
    elif kind == "arithmetic__round":
        x, places = m(r"Round (-?[\d.]+) to (\d) decimal places\.", question).groups()
        assert abs(Decimal(answer) - Decimal(x)) <= Decimal("0.5").scaleb(-int(places))
        assert max(0, -Decimal(answer).as_tuple().exponent) == int(places)
    elif kind == "numbers__base_conversion":
        n, base = map(int, m(r"Convert (\d+) \(base 10\) to base (\d+)\.", question).groups())
        assert int(answer, base) == n
    elif kind == "comparison__sort":
        values, order = m(r"Sort (.*) in (\w+) order\.", question).groups()
        expected = sorted(map(int, values.split(", ")), reverse=order == "decreasing")
        assert answer == ", ".join(map(str, expected))
    else:
        raise AssertionError(f"no check for {kind}")


@pytest.mark.parametrize("kind", sorted(MATH_PROBLEMS))
def test_math_problem_answers_are_correct(kind: str) -> None:
    rng = random.Random(kind)
    for _ in range(300):
        question, answer = MATH_PROBLEMS[kind](rng)
        _check_math(kind, question, answer)


def test_math_documents_are_deterministic_question_answer_batches() -> None:
    docs = math_documents(count=20, seed=7)
    assert docs == math_documents(count=20, seed=7)
    assert docs != math_documents(count=20, seed=8)
    for doc in docs:
        pairs = doc.split("\n\n")
        assert 10 <= len(pairs) <= 30
        assert all(re.fullmatch(r"Question: .+\nAnswer: .+", p) for p in pairs)


# ------------------------------------------------------------------------------------ table, errors


def test_domain_table_and_corpus_yaml() -> None:
    names = [d.name for d in DOMAINS]
    assert len(names) == len(set(names)) >= 16
    text = corpus_yaml("tinypile", names[:2])
    assert text == ("name: tinypile\ndomains:\n  - name: code_python\n"
                    "    path: code_python.jsonl\n  - name: code_go\n    path: code_go.jsonl\n")
    assert yaml.safe_load(text)["domains"][1] == {"name": "code_go", "path": "code_go.jsonl"}


def _failing_run(stderr: str):
    def run(cmd, cwd=None):
        return subprocess.CompletedProcess(cmd, 100, "", stderr)
    return run


def test_apt_failure_raises_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "_run", _failing_run("E: Unable to locate package nosuchpkg"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: no automatic apt-get update
    with pytest.raises(RuntimeError) as err:
        _apt_download(["nosuchpkg"], tmp_path)
    message = str(err.value)
    assert "nosuchpkg" in message and "apt-get download" in message
    assert "apt-get update" in message and "Unable to locate" in message


def test_pip_failure_raises_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "_run", _failing_run("ERROR: No matching distribution found"))
    with pytest.raises(RuntimeError, match=r"nosuchpkg==1\.0.*pip download.*No matching"):
        _pip_download("nosuchpkg==1.0", (), tmp_path)


# ------------------------------------------------------------------------------------ real build


@pytest.mark.network
@pytest.mark.slow
def test_build_tiny_tinypile_for_real(tmp_path: Path) -> None:
    spec = build_tinypile(tmp_path, tiny=True)
    assert spec == tmp_path / "tiny" / "corpus.yaml"
    corpus = yaml.safe_load(spec.read_text())
    assert corpus["name"] == "tinypile-tiny" and len(corpus["domains"]) >= 12
    manifest = json.loads((spec.parent / "manifest.json").read_text())
    assert manifest["params"]["tiny"] is True
    by_name = {d["name"]: d for d in manifest["domains"]}
    assert [d["name"] for d in corpus["domains"]] == list(by_name)
    for entry in corpus["domains"]:
        meta = by_name[entry["name"]]
        path = spec.parent / entry["path"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
        assert meta["bytes"] == len(data), entry["name"]
        # Its natural size: a share of what its sources hold, never under the floor
        available = sum(src["bytes_available"] for src in meta["sources"])
        assert MIN_DOMAIN_BYTES - 50_000 < len(data) <= max(TINY_SHARE * available,
                                                             MIN_DOMAIN_BYTES), entry["name"]
        assert meta["description"] and meta["license"]
        assert meta["documents"] == data.count(b"\n")
        for src in meta["sources"]:
            assert src["package"] and src["version"] and src["license"], src
        texts = [json.loads(line)["text"] for line in data.decode("utf-8").splitlines()]
        assert all(t.strip() and len(t.encode()) <= MAX_DOC_BYTES for t in texts)
        assert sum(len(t.encode()) < MIN_DOC_BYTES for t in texts) <= 1, entry["name"]
    assert by_name["bible"]["documents"] > 100
    assert json.loads((spec.parent / "bible.jsonl").read_text().splitlines()[0])["text"].split(
        "\n")[0].split()[-1].isdigit()  # "<Book> <chapter>"

    start = time.monotonic()
    assert build_tinypile(tmp_path, tiny=True) == spec  # cached
    assert time.monotonic() - start < 10
    again = json.loads((spec.parent / "manifest.json").read_text())
    assert [d["sha256"] for d in again["domains"]] == [d["sha256"] for d in manifest["domains"]]

    # determinism: rebuilding a domain from the cached downloads gives identical bytes
    domain = next(d for d in DOMAINS if d.name == "multilingual")
    paths = fetch_packages(domain.sources, tmp_path / "downloads")
    rebuilt = build_domain(domain, paths, TINY_SHARE, tmp_path)
    assert rebuilt["sha256"] == by_name["multilingual"]["sha256"]
