"""The content-addressed engine cache, and ``pladis cache`` (list, verify, clean).

An entry is a folder ``<cache>/<key>/`` holding the built artifacts and ``engine.json``; it is built in a
temporary sibling and renamed into place, so an interrupted build never leaves an entry that looks valid,
and two concurrent builds of one key cannot corrupt it (the second rename loses and is dropped). A lock
file serialises builders of the same key so the work is done once. Entries are immutable: their files are
read-only, engine folders receive copies (reflinks where the file system offers them, never hard links),
and every hit is checked against the hashes ``engine.json`` records; a bad entry is evicted and rebuilt.

The cache folder is marked by a ``CACHEDIR.TAG`` that names pladis (written with the first lock; backup
tools skip such folders). Only what the cache writes is ever touched — entries named by a 64-hex key,
``<key>.lock`` files and ``.<key>.<pid>.<hex>.tmp`` temporaries — and only inside a marked folder: any other
folder given as a cache is refused, so a mistyped ``--cache-dir`` cannot delete a user's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pladis.errors import PladisError, SettingError
from pladis.files import process_alive, replace_folder, sha256, temp_dir, umask, write_text
from pladis.manifest import ENGINE_FILE, MANIFEST_FILE, EngineRecord, seal_ok
from pladis.options import option

log = logging.getLogger(__name__)
MARKER = "CACHEDIR.TAG"
_TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# pladis engine cache (see `pladis cache`)\n"
_KEY = re.compile(r"[0-9a-f]{64}")
_TEMP = re.compile(r"\.([0-9a-f]{64})\.(\d+)\.[0-9a-f]+\.tmp")


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


def recorded_files(meta: dict) -> dict[str, str | None]:
    """{relative path: sha256 (None: presence only)} of every file an engine folder holds, as its engine.json
    records them: the artifacts and their external data, the export manifest, tokenizers and scheduler."""
    record = EngineRecord.from_dict(meta)
    files = {f.file: f.sha256 for artifact in record.components.values() for f in artifact.files}
    files[MANIFEST_FILE] = record.source_manifest_sha256
    files.update(meta.get("files", {}))
    return files


def problems(folder: Path) -> list[str]:
    """What is wrong with an entry (or an engine folder): unreadable engine.json, missing or changed files."""
    try:
        meta = json.loads((folder / ENGINE_FILE).read_text())
        recorded = recorded_files(meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{ENGINE_FILE}: {type(err).__name__}"]
    out = [] if seal_ok(meta) else [f"{ENGINE_FILE}: edited after the build"]
    for rel, digest in recorded.items():
        p = folder / rel
        if not p.is_file():
            out.append(f"{rel}: missing")
        elif digest is not None and sha256(p) != digest:
            out.append(f"{rel}: sha256 differs from engine.json")
    return out


def lookup(cache: Path, k: str) -> Path | None:
    """The verified entry for key ``k``, or None; an entry that fails its check is evicted (and reported)."""
    entry = cache / k
    if not entry.exists():
        return None
    bad = problems(entry)
    if bad:
        log.warning(f"cache entry {k[:12]} is damaged ({'; '.join(bad[:3])}): evicting it and rebuilding")
        evict(entry)
        return None
    return entry


def evict(entry: Path) -> None:
    """Remove an entry (its read-only files included)."""
    shutil.rmtree(entry, ignore_errors=True)


def is_cache(folder: Path) -> bool:
    """Whether ``folder`` is a pladis engine cache: its CACHEDIR.TAG names pladis, or (a cache written before
    the tag) every name in it is one the cache writes."""
    try:
        return "pladis" in (folder / MARKER).read_text()
    except OSError:
        pass
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    return bool(names) and all(_kind(n) for n in names)


def _kind(name: str) -> str | None:
    """What the cache file or folder called ``name`` is ("entry", "lock", "temporary"), or None: not the cache's."""
    if _KEY.fullmatch(name):
        return "entry"
    if name.endswith(".lock") and _KEY.fullmatch(name[: -len(".lock")]):
        return "lock"
    if _TEMP.fullmatch(name):
        return "temporary"
    if name == MARKER or (name.startswith(f".{MARKER}.") and name.endswith(".tmp")):
        return "marker"
    return None


def check_cache(cache: Path) -> Path:
    """Refuse (PladisError) a folder that holds anything and is not a pladis cache; returns ``cache``."""
    if cache.exists() and not cache.is_dir():
        raise PladisError(f"engine cache {cache} is a file, not a folder: check --cache-dir / $PLADIS_CACHE")
    if cache.is_dir() and any(cache.iterdir()) and not is_cache(cache):
        raise PladisError(f"{cache} is not a pladis engine cache (it has no {MARKER} written by pladis): pladis "
                          "never writes or deletes there; check --cache-dir / $PLADIS_CACHE or choose an empty or "
                          "new folder")  # fmt: skip
    return cache


def _mark(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / MARKER).is_file():
        write_text(cache / MARKER, _TAG)


@contextlib.contextmanager
def locked(cache: Path, k: str):
    """Hold an exclusive lock for building key ``k`` (other builders of the same key wait). The lock file is
    removed on release; a waiter that then holds the removed file's lock opens the path again."""
    _mark(check_cache(cache))
    path = cache / f"{k}.lock"
    while True:
        f = open(path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # released and removed while we waited: lock the new file
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: no other builder can hold this inode now
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def commit(cache: Path, k: str, built: Path) -> Path:
    """Make the finished build folder ``built`` the read-only entry for ``k`` (first writer wins)."""
    entry = cache / k
    for p in built.rglob("*"):
        if p.is_file():
            p.chmod(p.stat().st_mode & 0o444)  # immutable: nothing writes into an entry after this
    try:
        os.replace(built, entry) if not entry.exists() else shutil.rmtree(built)
    except OSError:  # another process committed the same key in between: keep theirs
        shutil.rmtree(built, ignore_errors=True)
    return entry


def materialize(entry: Path, out: Path) -> None:
    """Make ``out`` a writable copy of the entry (reflinked where the file system can, else copied), through a
    temporary sibling renamed at the end. The copy shares no inode with the cache."""
    tmp = temp_dir(out)
    try:
        shutil.copytree(entry, tmp, copy_function=_reflink_or_copy, dirs_exist_ok=True)
        for p in tmp.rglob("*"):
            if p.is_file():
                p.chmod(0o666 & ~umask())
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_FICLONE = 0x40049409  # Linux ioctl: share the data blocks copy-on-write (btrfs, xfs); fails elsewhere


def _reflink_or_copy(src: str, dst: str) -> None:
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        try:
            fcntl.ioctl(fd.fileno(), _FICLONE, fs.fileno())
            return
        except OSError:
            pass
        shutil.copyfileobj(fs, fd, 1 << 24)


def leftovers(cache: Path) -> list[tuple[str, str]]:
    """(name, what) of the temporaries and lock files no running build holds (a build killed with kill -9)."""
    out = []
    for p in sorted(cache.iterdir()) if cache.is_dir() else []:
        kind = _kind(p.name)
        if kind == "temporary" and not process_alive(int(_TEMP.fullmatch(p.name).group(2))):
            out.append((p.name, "temporary of a killed build"))
        elif kind == "lock" and not _held(p):
            out.append((p.name, "lock of a killed build"))
    return out


def _held(lock: Path) -> bool:
    try:
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return True  # cannot even open it: leave it alone
    return False


def clean_leftovers(cache: Path) -> list[str]:
    """Remove the cache's temporaries and lock files that no running build holds (kill -9); returns their names."""
    removed = []
    if not is_cache(cache):
        return removed
    for name, _ in leftovers(cache):
        p = cache / name
        if name.endswith(".lock"):
            with open(p, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a build took it in the meantime
                p.unlink(missing_ok=True)  # held: see `locked`
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(name)
    return removed


def clean(cache: Path) -> list[str]:
    """``clean_leftovers`` and every damaged entry; returns what went."""
    check_cache(cache)
    removed = clean_leftovers(cache)
    for entry in entries(cache):
        if problems(entry):
            evict(entry)
            removed.append(entry.name)
    return removed


def entries(cache: Path) -> list[Path]:
    """The cache's entries: folders named by a key."""
    return sorted(p for p in cache.iterdir() if p.is_dir() and _KEY.fullmatch(p.name)) if cache.is_dir() else []


# --------------------------------------------------------------------------------------------------
# `pladis cache`
# --------------------------------------------------------------------------------------------------


@dataclass
class CacheConfig:
    """Settings of ``pladis cache``."""

    action: str = option("list", "list (entries with backend, size, state; leftovers of killed builds) | verify "
                         "(exit 1 on damage) | clean (remove damaged entries, stale temporaries and locks: only "
                         "what the cache wrote)", positional=True)  # fmt: skip
    cache_dir: str = option("", "engine cache; default: $PLADIS_CACHE or ~/.cache/pladis/engines")


def run_cache(cfg: CacheConfig) -> tuple[str, bool]:
    """``pladis cache``: (text to print, whether everything is sound)."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_dir()
    if cfg.action not in ("list", "verify", "clean"):
        raise SettingError("action", f"action must be list, verify or clean; got {cfg.action!r}")
    check_cache(cache)
    if cfg.action == "clean":
        removed = clean(cache)
        return f"{cache}: removed {len(removed)}" + "".join(f"\n  {r}" for r in removed), True
    rows, ok = [f"cache {cache}", "| key | backend | MB | state |", "| --- | --- | --- | --- |"], True
    for entry in entries(cache):
        bad = problems(entry)
        ok &= not bad
        try:
            backend = json.loads((entry / ENGINE_FILE).read_text()).get("backend", "?")
        except (OSError, ValueError):
            backend = "?"
        size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file()) / 1e6
        state = "ok" if not bad else "DAMAGED: " + "; ".join(bad[:3])
        rows.append(f"| {entry.name[:12]} | {backend} | {size:.1f} | {state} |")
    for name, what in leftovers(cache):
        rows.append(f"| {name} | - | - | {what}: `pladis cache clean` removes it |")
    return "\n".join(rows), ok or cfg.action == "list"
