"""Markup to plain text: roff (man pages), MediaWiki wikitext and Perl POD."""

from __future__ import annotations

import html
import re
import unicodedata

from regmix.data.tinypile.text import clean_text

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
