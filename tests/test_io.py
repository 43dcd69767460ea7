"""Atomic files and folders, output folders checked before compute, a full disk as one line (sep_hf.utils.io)."""
from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest

from sep_hf.utils import io
from sep_hf.utils.io import OutputError, atomic_folder, check_writable, reporting_full_disk, scratch_folder


def test_atomic_folder_replaces_the_folder_whole_or_keeps_the_previous_one(tmp_path):
    target = tmp_path / "dataset"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("first")
    assert [path.name for path in tmp_path.iterdir()] == ["dataset"] and (target / "a.txt").read_text() == "first"
    with pytest.raises(OSError), atomic_folder(target) as staging:
        (staging / "b.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert [path.name for path in tmp_path.iterdir()] == ["dataset"] and sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(path.name for path in target.iterdir()) == ["b.txt"] and len(list(tmp_path.iterdir())) == 1


def test_scratch_folder_is_removed_however_the_block_ends(tmp_path):
    leftover = tmp_path / ".partial-0" / "tmp-of-a-killed-run"
    leftover.parent.mkdir()
    leftover.write_text("x")
    with pytest.raises(RuntimeError), scratch_folder(tmp_path / ".partial-0") as scratch:
        assert list(scratch.iterdir()) == []  # a killed run's leftover is gone
        (scratch / "tmp123").write_text("half")
        raise RuntimeError("fails")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_is_checked_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "out").is_dir() and list((tmp_path / "new" / "out").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=rf"Output folder {tmp_path / 'file' / 'out'} cannot be written"):
        check_writable(tmp_path / "file" / "out")


def test_a_full_disk_is_one_line_whatever_the_writer_raises(tmp_path, monkeypatch):
    with pytest.raises(OutputError, match=rf"No space left on the device of {tmp_path}: free some space"):
        with reporting_full_disk(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100, 100, 0))
    with pytest.raises(OutputError, match="No space left"):  # safetensors, torch.save: no errno, the disk is full
        with reporting_full_disk(tmp_path / "not-yet-created"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100, 0, 100 * io.FULL_DISK_BYTES))
    with pytest.raises(RuntimeError, match="a bug"), reporting_full_disk(tmp_path):  # room left: not the disk's fault
        raise RuntimeError("a bug")
