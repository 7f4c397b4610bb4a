"""Plain-text helpers for tinypile: cleaning, decoding, splitting and packing documents."""

from __future__ import annotations

import bz2
import gzip
import re
from collections.abc import Iterable

MIN_DOC_BYTES = 200
MAX_DOC_BYTES = 50_000


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
