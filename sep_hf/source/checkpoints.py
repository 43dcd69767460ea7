"""Checkpoint folders: ``checkpoints/epoch-XXX/{model.safetensors, training_state.pt, record.json}``.

A checkpoint is written into a hidden staging folder and renamed into place only when complete
(``utils.io.atomic_folder``: a full disk leaves no partial folder); ``record.json`` holds the sha256
of every other file, so a half-written or truncated checkpoint (locally or from the Hub) is never loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from sep_hf.utils.io import atomic_folder

__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointError",
    "Checkpoint",
    "checkpoint_dirname",
    "save_checkpoint",
    "list_checkpoints",
    "evenly_spaced",
]

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
RECORD_FILE = "record.json"
_DIRNAME = re.compile(r"^epoch-(\d{3,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not match its siblings."""


def checkpoint_dirname(epoch: int) -> str:
    """``epoch-004``: the folder of an epoch's checkpoint (three digits at least, so names sort)."""
    return f"epoch-{epoch:03d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder: its path, epoch and record (record.json with the sha256 of every file)."""

    path: Path
    record: dict

    @property
    def epoch(self) -> int:
        return self.record["epoch"]

    @property
    def content_hash(self) -> str:
        """Identity of the weights (sha256 of model.safetensors), used in cache fingerprints."""
        return self.record["files"][MODEL_FILE]

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / MODEL_FILE)

    def load_training_state(self) -> dict:
        if not (self.path / STATE_FILE).exists():
            raise CheckpointError(f"{self.path} has no {STATE_FILE}; it cannot be resumed from.")
        return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)

    def verify(self, names: list[str] | None = None) -> Checkpoint:
        """Check the sha256 of ``names`` (default: every file the record lists)."""
        files = self.record.get("files", {})
        for name in names if names is not None else list(files):
            expected = files.get(name)
            file = self.path / name
            if not file.exists() or _sha256(file) != expected:
                raise CheckpointError(f"Checkpoint file {file} is missing or corrupted (sha256 mismatch).")
        return self


def save_checkpoint(
    root: str | Path, epoch: int, state_dict: dict[str, torch.Tensor], record: dict, training_state: dict | None = None
) -> Checkpoint:
    """Write ``root/checkpoints/epoch-XXX`` atomically and return it.

    The files are serialized in memory and written by Python: safetensors and ``torch.save`` writing
    to a path report a full disk in exception types of their own, a Python write as ENOSPC.
    """
    contents = {MODEL_FILE: safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})}
    if training_state is not None:
        buffer = io.BytesIO()
        torch.save(training_state, buffer)
        contents[STATE_FILE] = buffer.getvalue()
    files = {name: hashlib.sha256(content).hexdigest() for name, content in contents.items()}
    record = {**record, "epoch": epoch, "files": files}
    final = Path(root) / CHECKPOINTS_DIR / checkpoint_dirname(epoch)
    with atomic_folder(final) as staging:
        for name, content in contents.items():
            (staging / name).write_bytes(content)
        with open(staging / RECORD_FILE, "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
    return Checkpoint(final, record)


def _read(path: Path) -> Checkpoint | None:
    record_file = path / RECORD_FILE
    if not _DIRNAME.match(path.name) or not record_file.exists():
        return None
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError:
        return None
    if not (path / MODEL_FILE).exists():
        return None
    return Checkpoint(path, record)


def list_checkpoints(root: str | Path) -> list[Checkpoint]:
    """Complete checkpoints under ``root/checkpoints`` (or ``root`` itself), sorted by epoch."""
    root = Path(root)
    parent = root / CHECKPOINTS_DIR if (root / CHECKPOINTS_DIR).is_dir() else root
    if not parent.is_dir():
        return []
    found = (_read(path) for path in parent.iterdir() if path.is_dir())
    return sorted((ckpt for ckpt in found if ckpt is not None), key=lambda ckpt: ckpt.epoch)


def evenly_spaced(items: list, num: int | None) -> list:
    """``num`` items evenly spaced over ``items``, always ending with the last one (None: all).

    The one picker for both ends of the ensemble: the epochs a source run checkpoints and the
    checkpoints an ensemble loads.
    """
    if num is None or num == len(items):
        return list(items)
    if num <= 0 or num > len(items):
        raise CheckpointError(f"Asked for {num} checkpoints (--num_models) but {len(items)} are available.")
    return [items[round((index + 1) * len(items) / num) - 1] for index in range(num)]
