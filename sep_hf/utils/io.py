"""Atomic writes: a killed process (or a full disk) leaves either the previous file or folder or the new one, never half.

Every file the product writes for later reuse (results, cached class means, fitting states, the
loopback Hub's metadata) goes through ``atomic_write``; every folder published or resumed from
(the protected dataset, a checkpoint) through ``atomic_folder``. ``check_writable`` refuses an
output folder that cannot be written before any compute, and ``reporting_full_disk`` turns a disk
that fills mid-run into one line naming the folder (``OutputError``, a user error). Plain Python
only: the loopback Hub imports it without torch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "write_json", "atomic_folder", "scratch_folder", "OutputError", "check_writable",
           "reporting_full_disk"]

# Below this many free bytes a failed write is taken for a full disk: safetensors, torch.save and
# other native writers report ENOSPC in exception types of their own, without an errno.
FULL_DISK_BYTES = 1 << 20


class OutputError(ValueError):
    """An output folder cannot be written (read-only, not a folder, its disk full); the message names it."""


def atomic_write(path: str | Path, write: Callable[[Path], None] | bytes | str) -> Path:
    """Write ``path`` through a temporary sibling renamed into place.

    ``write`` is the content (bytes or text) or a function that writes a given path (for
    ``torch.save``, ``safetensors.save_file``, ...). The temporary name carries the pid, so two
    processes writing the same file never share a temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(write, bytes):
            tmp.write_bytes(write)
        elif isinstance(write, str):
            tmp.write_text(write)
        else:
            write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, payload) -> Path:
    """Sorted, indented JSON written atomically (results.json, bench results)."""
    return atomic_write(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


@contextmanager
def scratch_folder(path: str | Path) -> Iterator[Path]:
    """An empty folder ``path`` for the block's temporary files, removed when the block ends however it ends
    (a full disk, an error); a killed run's leftover is removed on entry. One process per folder."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Write the folder ``path`` through a sibling staging folder renamed into place when the block ends.

    Yields the staging folder. Readers see the previous folder or the new one, never part of one;
    on any failure the staging folder is removed and the previous folder kept. One writer per
    folder at a time (the main process): the staging name is fixed, so a killed run's leftover is
    replaced by the next run.
    """
    path = Path(path)
    previous = path.with_name(f".{path.name}.old")  # a crash between the two renames below leaves it
    shutil.rmtree(previous, ignore_errors=True)
    with scratch_folder(path.with_name(f".{path.name}.partial")) as staging:
        yield staging
        if path.exists():
            os.replace(path, previous)
        os.replace(staging, path)
    shutil.rmtree(previous, ignore_errors=True)


def check_writable(folder: str | Path) -> Path:
    """Before any compute: create ``folder`` and write a file in it; ``OutputError`` (one line) if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f".write-check-{os.getpid()}", b"\0" * 4096).unlink()
    except OSError as err:
        raise OutputError(f"Output folder {folder} cannot be written ({err.strerror or err}): pass --output_dir a "
                          "folder you can write to.") from err
    return folder


def _disk_is_full(folder: Path) -> bool:
    while not folder.exists():  # the folder may not exist yet: its disk is its nearest existing parent's
        folder = folder.parent
    return shutil.disk_usage(folder).free < FULL_DISK_BYTES


@contextmanager
def reporting_full_disk(folder: str | Path) -> Iterator[None]:
    """Turn a write that fails because the disk (or quota) under ``folder`` is full into ``OutputError``,
    one line naming the folder: what the user can act on, instead of a library's traceback."""
    try:
        yield
    except OutputError:
        raise
    except Exception as err:
        if getattr(err, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and not _disk_is_full(Path(folder)):
            raise
        where = getattr(err, "filename", None) or folder  # a Python write names its file (maybe in a cache)
        raise OutputError(f"No space left on the device of {where}: free some space (or pass --output_dir on "
                          "another disk) and run again; finished checkpoints and crafted shards are kept.") from err
