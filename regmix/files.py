"""Atomic writes: a reader sees a file or folder whole, old or new, never half written.

Content goes into a `.partial` sibling first and is renamed onto the real name only when the
write finished; a crash leaves at most that sibling, which the next write clears.
"""

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
