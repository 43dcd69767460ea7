"""Atomic file writes: a killed process leaves either the previous file or the new one, never half.

Every file the product writes for later reuse (results, cached class means, fitting states, the
loopback Hub's metadata) goes through ``atomic_write``. Plain Python only: the loopback Hub
imports it without torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "write_json"]


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
