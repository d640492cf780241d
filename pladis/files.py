"""File output: atomic writes with ordinary permissions.

Every file and folder pladis writes is created under a temporary sibling name and renamed into place, so
nothing half-written ever looks complete, and gets the modes the process umask gives (0644 / 0755 under
umask 022), so a folder built by one user (root in a container build) can be read by another.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Free space below which a failed write is taken for a full disk: libraries that write through C++ (ONNX Runtime
# saving an optimised graph) report a full disk as their own error ("INVALID_PROTOBUF"), not as ENOSPC.
_NEARLY_FULL = 16 << 20


@contextlib.contextmanager
def no_space(folder: str | os.PathLike):
    """Turn a full disk while writing into ``folder`` into one ``NoSpace`` error naming it (ENOSPC, EDQUOT,
    or any failure while the file system holding ``folder`` has less than 16 MiB free)."""
    from pladis.errors import NoSpace, PladisError

    try:
        yield
    except PladisError:
        raise
    except Exception as err:
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        if isinstance(err, shutil.Error):  # copytree gathers its failures as text
            full = any(f"[Errno {n}]" in str(err) for n in (errno.ENOSPC, errno.EDQUOT))
        if not full:
            try:
                full = shutil.disk_usage(_existing(Path(folder))).free < _NEARLY_FULL
            except OSError:
                full = False
        if full:
            raise NoSpace(f"no space left on device in {folder}: free some space or choose another location") from err
        raise


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def temp_dir(target: str | os.PathLike) -> Path:
    """A new empty folder beside ``target`` (``.<name>.<pid>.<random>.tmp``) with umask modes, to fill and
    then rename onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            tmp.mkdir(mode=0o777)  # the umask applies
            return tmp
        except FileExistsError:
            continue


# --------------------------------------------------------------------------------------------------
# The output rule: what a command may create or replace
# --------------------------------------------------------------------------------------------------

# A folder pladis wrote is recognised by the JSON file it always holds and that file's "format" prefix.
FOLDER_KINDS = {
    "export": ("manifest.json", "pladis-onnx/"),
    "engine": ("engine.json", "pladis-engine/"),
    "demo": ("demo.json", "pladis-demo/"),
}


# Every folder pladis publishes (``replace_folder``) lists the files it wrote in this file, one relative path a
# line: ``--force`` replaces such a folder only while it holds nothing else (a user's notes put inside survive).
INVENTORY = ".pladis-files"


def _files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def write_inventory(folder: str | os.PathLike) -> None:
    """Record every file now in ``folder`` (its relative paths, sorted) in its ``INVENTORY``."""
    folder = Path(folder)
    names = sorted(_files_in(folder) - {INVENTORY})
    write_text(folder / INVENTORY, "".join(f"{n}\n" for n in names))


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """The files in ``folder`` that its ``INVENTORY`` does not list (relative paths, sorted): what someone else
    put there after pladis wrote it. A folder without an inventory (written before pladis kept one): none."""
    folder = Path(folder)
    try:
        listed = set((folder / INVENTORY).read_text().splitlines())
    except OSError:
        return []
    return sorted(_files_in(folder) - listed - {INVENTORY})


def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of pladis folder ``path`` is ("export", "engine", "demo"), or None."""
    path = Path(path)
    for kind in ("engine", "demo", "export"):  # an engine folder holds the export's manifest too
        marker, prefix = FOLDER_KINDS[kind]
        try:
            fmt = json.loads((path / marker).read_text()).get("format", "")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fmt, str) and fmt.startswith(prefix):
            return kind
    return None


def check_output_folder(out: str | os.PathLike, kind: str, force: bool, inputs: tuple = ()) -> Path:
    """Apply the output rule to a folder a command is about to write, before any work; returns it resolved.

    A new path (or an empty folder) is created; an existing pladis folder of the same ``kind`` is replaced
    only with ``force``, and only while it holds no file its ``INVENTORY`` does not list; anything else — a
    file, another folder, one of the command's ``inputs``, a folder that contains one or one inside it — is
    refused, ``force`` or not. The parent must be writable.
    """
    from pladis.errors import PladisError

    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or out in src.parents:
            raise PladisError(f"output {out} is (or contains) the input {src}; choose another output folder")
        if src in out.parents:  # a later --force on the input would take the output with it
            raise PladisError(f"output {out} is inside the input {src}; choose an output folder outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise PladisError(f"output {out} exists and is not a folder; pladis never replaces it: choose a new path")
        if any(out.iterdir()):
            found = folder_kind(out)
            if found != kind:
                what = f"a pladis {found} folder" if found else "a folder pladis did not write"
                raise PladisError(f"output {out} is {what}; pladis replaces only its own {kind} folders: choose "
                                  "a new or empty folder")  # fmt: skip
            if not force:
                raise PladisError(f"output {out} holds an earlier {kind}; pass --force (force=True) to replace it")
            foreign = foreign_files(out)
            if foreign:
                more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
                raise PladisError(f"output {out} holds files pladis did not write ({', '.join(foreign[:3])}{more}), "
                                  "which replacing it would delete: move them out of it and run again, or choose "
                                  "another output folder")  # fmt: skip
    check_writable(out.parent, keep=False)
    return out


def check_writable(folder: str | os.PathLike, keep: bool = True) -> None:
    """Raise PladisError unless files can be created in ``folder`` (created if missing; with ``keep`` False the
    folders this check created are removed again, so a command refused later leaves nothing behind)."""
    from pladis.errors import PladisError

    folder = Path(folder)
    created = []
    try:
        for parent in [*reversed(folder.parents), folder]:
            if not parent.exists():
                try:
                    parent.mkdir()
                    created.append(parent)
                except FileExistsError:  # made meanwhile by someone else: not ours to remove
                    pass
        fd, probe = tempfile.mkstemp(prefix=".pladis-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PladisError(f"cannot write in {folder}: {err.strerror or err}; choose a writable location") from None
    finally:
        for parent in reversed(created if not keep else []):
            with contextlib.suppress(OSError):  # something else put a file there meanwhile: keep it
                parent.rmdir()


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...], force: bool = False) -> Path:
    """Check a file output before any work: its suffix, not an existing folder, an existing file replaced
    only with ``force``, a writable parent."""
    from pladis.errors import PladisError

    path = Path(path)
    if path.is_dir():
        raise PladisError(f"{path} is a folder; name a file to write, e.g. {path / ('out' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        ends = suffixes[0] if len(suffixes) == 1 else f"one of {', '.join(suffixes)}"
        raise PladisError(f"{path}: the file name must end in {ends} (that is what is written)")
    if path.exists() and not force:
        raise PladisError(f"{path} exists; pass --force to replace it, or choose another name")
    check_writable(path.parent, keep=False)
    return path


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``out``; an old ``out`` (already checked by
    ``check_output_folder``) is moved aside first and removed only after the rename. ``tmp``'s files are
    recorded in its ``INVENTORY`` first."""
    write_inventory(tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (``.*.<pid>.<hex>.tmp`` / ``.old``) that processes which no longer run left
    in ``folder`` (kill -9 during an export or build); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.*.*.*"):
        parts = p.name.rsplit(".", 3)
        if len(parts) != 4 or parts[3] not in ("tmp", "old") or not parts[1].isdigit():
            continue
        if not process_alive(int(parts[1])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
