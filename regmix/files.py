"""Atomic writes: a reader sees a file or folder whole, old or new, never half written.

Content goes into a `.partial` sibling first and is renamed onto the real name only when the
write finished; a crash leaves at most that sibling, which the next write clears. A folder
kept for later reuse also records its files' checksums, checked before it is trusted.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """$REGMIX_CACHE, else ~/.cache/regmix: corpora, checkpoints, results kept for MLflow.
    On a cluster it points at the shared volume, so a retried pod finds what it left."""
    env = os.environ.get("REGMIX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "regmix"


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a path to write `path`'s new content to (a file or a folder); on success it
    replaces `path`, on failure it is removed and `path` is untouched."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    _remove(partial)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if partial.is_dir() and path.exists():
        # A folder cannot be renamed over another: move the old one aside first.
        old = path.with_name(path.name + ".old")
        _remove(old)
        os.replace(path, old)
        os.replace(partial, path)
        _remove(old)
    else:
        os.replace(partial, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


@contextmanager
def removing(path: Path | None) -> Iterator[Path | None]:
    """A scratch path (or None) that is gone on exit, whether the work finished or failed."""
    try:
        yield path
    finally:
        if path is not None:
            _remove(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as partial:
        partial.write_bytes(data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------- checksums of kept folders
CHECKSUMS = "regmix-checksums.json"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read a MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Record every file's size and sha256 in `folder`, so that a later reader can tell a whole
    folder from one a crash, a full disk or a bad copy left damaged (`damage`)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): [p.stat().st_size, file_sha256(p)] for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def damage(folder: Path, contents: bool = True) -> str | None:
    """What is wrong with a folder `write_checksums` recorded (a file missing, of another size,
    or, with `contents`, other bytes), or None if it is whole. A folder without checksums
    (written before they were kept) is taken as whole."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return f"{folder / CHECKSUMS} is not JSON"
    for name, (size, sha256) in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, not {size}"
        if contents and file_sha256(path) != sha256:
            return f"{path} does not have the bytes written"
    return None
