"""The content-addressed engine cache.

An entry is a folder ``<cache>/<key>/`` holding the built artifacts and ``engine.json``; it is built in a
temporary sibling and renamed into place, so an interrupted build never leaves an entry that looks
valid, and two concurrent builds of one key cannot corrupt it (the second rename loses and is dropped).
A lock file serialises builders of the same key so the work is done once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

ENGINE_FILE = "engine.json"


def default_dir() -> Path:
    return Path(os.environ.get("PLADIS_CACHE", Path.home() / ".cache" / "pladis" / "engines"))


def key(parts: dict) -> str:
    """sha256 of the canonical JSON of everything that changes a build's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def source_hash(paths: list[Path]) -> str:
    """sha256 over source files (the operator, its ONNX body, plugin and kernel sources)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def lookup(cache: Path, k: str) -> Path | None:
    """The complete entry for key ``k``, or None."""
    entry = cache / k
    return entry if (entry / ENGINE_FILE).is_file() else None


@contextlib.contextmanager
def locked(cache: Path, k: str):
    """Hold an exclusive lock for building key ``k`` (other builders of the same key wait)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{k}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def commit(cache: Path, k: str, built: Path) -> Path:
    """Rename the finished build folder ``built`` into the entry for ``k`` (first writer wins)."""
    entry = cache / k
    try:
        os.replace(built, entry) if not entry.exists() else shutil.rmtree(built)
    except OSError:  # another process committed the same key in between: keep theirs
        shutil.rmtree(built, ignore_errors=True)
    return entry


def materialize(entry: Path, out: Path) -> None:
    """Make ``out`` a copy of the entry: hard links where the filesystem allows (instant for GB files),
    through a temporary sibling renamed at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(entry, tmp, copy_function=_link_or_copy)
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        shutil.rmtree(old)
    os.replace(tmp, out)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
