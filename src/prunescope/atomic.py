"""Atomic writes: build a file or folder under a temporary sibling name, flush it, rename it.

A reader (or a later run) sees either the finished folder or nothing at that path: an interrupted
write (Ctrl-C, a full disk, a crash) leaves at most a hidden ``.NAME.tmp-*`` sibling, never a
half-written folder that loads as a finished one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it exists, else its closest existing parent (where it would be created)."""
    absolute = Path(path).absolute()
    return next(p for p in (absolute, *absolute.parents) if p.exists())


def unwritable_place(path: str | os.PathLike[str]) -> Path | None:
    """The closest existing ancestor of ``path`` (or ``path``) when it is not a folder this
    process can create entries in, else None: ``path`` can be created or written."""
    existing = nearest_existing(path)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return existing
    try:  # permissions say yes; only creating something tells (root, read-only mounts, /proc)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".prunescope-probe-"))
    except OSError:
        return existing
    return None


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (names) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folders' entries."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of the file ``path`` to write (same suffix, so writers that go
    by it still do); on success flush it to disk and rename it onto ``path``, on any exception
    remove it and re-raise. Readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _raise_naming(exc, tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish(tmp: Path, folder: Path) -> None:
    """Move the finished ``tmp`` folder onto ``folder``; an old folder there is removed only after."""
    backup = None
    if folder.exists():
        backup = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(folder, backup)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if backup is not None:
            os.replace(backup, folder)
        raise
    fsync_dir(folder.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def new_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``folder`` to fill; on success flush it and rename it onto
    ``folder`` (replacing what was there), on any exception remove it and re-raise."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        yield tmp
        fsync_tree(tmp)
        publish(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming(exc, tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _raise_naming(exc: OSError, tmp: Path, final: Path) -> None:
    """Re-raise ``exc`` about the path the user asked for instead of the temporary one (which no
    longer exists): a full disk is reported as ``... (out/report.json)``."""
    name = str(exc.filename or "")
    if not name.startswith(str(tmp)):
        raise exc
    raise type(exc)(exc.errno, exc.strerror, str(final) + name[len(str(tmp)):]) from exc
