"""Binary formats tinypile reads: compress(1) LZW, R's serialized data, dictd dictionaries."""

from __future__ import annotations

import gzip
import struct
import zlib

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
