"""Build tinypile: each domain's documents selected under a byte cap, written as JSONL with a manifest."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from regmix.data.tinypile.extractors import BUILDER_VERSION
from regmix.data.tinypile.mathgen import MATH_SEED
from regmix.data.tinypile.sources import (
    DOMAINS,
    Domain,
    _version,
    detect_license,
    fetch_packages,
    read_source,
)
from regmix.data.tinypile.text import MAX_DOC_BYTES, MIN_DOC_BYTES, _nbytes, pack
from regmix.files import cache_root, write_bytes

LOG = logging.getLogger("regmix.tinypile")
# Each domain keeps this share of the text its sources hold (measured as jsonl bytes), so the
# domains have their natural, unequal sizes, as a crawl's do (a few big sources dominate):
# 0.2-3.0 MB a domain for the tiny build, 17 MB in all; the full build holds four times that.
TINY_SHARE, FULL_SHARE = 0.075, 0.3
MIN_DOMAIN_BYTES = 200_000  # enough for a validation split and training text
BUILD_WORKERS = 2  # domains are extracted in parallel processes


DEFAULT_DIR: Path = cache_root() / "tinypile"


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


def build_domain(domain: Domain, paths: dict[str, Path], share: float, out_dir: Path) -> dict:
    """Extract, normalise, select `share` of what the domain's sources hold (at least
    MIN_DOMAIN_BYTES) and write one domain; return its manifest entry."""
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
    available = sum(info["bytes_available"] for info in sources)
    cap_bytes = min(available, max(MIN_DOMAIN_BYTES, round(share * available)))
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
            "share_of_available": TINY_SHARE if tiny else FULL_SHARE,
            "min_domain_bytes": MIN_DOMAIN_BYTES,
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


def _build_domains(paths: dict[str, Path], share: float, build_dir: Path) -> Iterator[dict]:
    """Manifest entries of all domains, in table order, built by BUILD_WORKERS processes.

    Uses fork: spawn/forkserver would re-import the caller's __main__, which deadlocks on
    the build lock when a calling script has no ``if __name__ == "__main__"`` guard."""
    workers = min(BUILD_WORKERS, os.cpu_count() or 1)
    if workers < 2 or multiprocessing.current_process().daemon:
        for domain in DOMAINS:
            yield build_domain(domain, paths, share, build_dir)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        jobs = [pool.submit(build_domain, d, paths, share, build_dir) for d in DOMAINS]
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
        entries = []
        for entry in _build_domains(paths, params["share_of_available"], build_dir):
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
    parser.add_argument("--tiny", action="store_true", help="17 MB in all, 0.2-3 MB a domain")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tinypile(args.out, tiny=args.tiny, force=args.force))


if __name__ == "__main__":
    main()
