"""recipes/protect.py: 1 vs 2 processes byte-identical, kill-and-resume, bad input, nothing half-published."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import datasets
import pytest
from huggingface_hub import HfApi
from PIL import Image

from conftest import REPO_ROOT, launch_command, run_recipe
from sep_hf.data import DataArguments, DatasetError
from sep_hf.hub import HubError
from sep_hf.protect import ProtectArguments, run_protection
from sep_hf.runs import RunArguments
from sep_hf.training import SourceTrainingConfig


def _args(checkpoints, output_dir, *extra):
    return ["--dataset", "cifar10", "--preset", "cpu", "--checkpoints", checkpoints, "--num_models", 4,
            "--method", "sep-fa-vr", "--steps", 2, "--max_train_samples", 120, "--max_eval_samples", 40,
            "--shard_size", 20, "--craft_batch_size", 20, "--output_dir", output_dir, *extra]


def _image_bytes(folder):
    dataset = datasets.load_dataset(str(folder / "dataset"))
    return {name: [row["bytes"] for row in split.cast_column("img", datasets.Image(decode=False))["img"]]
            for name, split in dataset.items()}


def _file_hashes(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((folder / "dataset" / "data").glob("*.parquet"))}


@pytest.fixture(scope="module")
def one_process(loopback_hub, tiny_source_run, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("protect-1proc")
    run_recipe("protect.py", _args(tiny_source_run, output_dir))
    return output_dir


def test_results_and_schema(one_process):
    results = json.loads((one_process / "results.json").read_text())
    assert results["counts"] == {"train": 120, "test": 40}
    assert results["method"] == "sep-fa-vr" and results["eps"] == 8 and 0 < results["max_linf"] <= 8
    assert results["mean_psnr"] > 30 and {"crafting", "preparation", "publishing"} <= set(results["wall_seconds"])
    protected = datasets.load_dataset(str(one_process / "dataset"))
    clean = datasets.load_dataset("uoft-cs/cifar10")
    assert protected["train"].features == clean["train"].features


@pytest.mark.slow
def test_two_processes_give_the_same_bytes(one_process, tiny_source_run, tmp_path):
    result = run_recipe("protect.py", _args(tiny_source_run, tmp_path), num_processes=2)
    assert json.loads((tmp_path / "results.json").read_text())["num_processes"] == 2, result.stdout[-2000:]
    assert _image_bytes(tmp_path) == _image_bytes(one_process)
    assert _file_hashes(tmp_path) == _file_hashes(one_process)


@pytest.mark.slow
def test_killed_crafting_resumes_to_the_same_bytes(one_process, tiny_source_run, tmp_path):
    process = subprocess.Popen(launch_command("protect.py", _args(tiny_source_run, tmp_path)), cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = tmp_path / "shards" / "train"
    deadline = time.time() + 300
    while not list(shards.glob("shard-*.arrow")):
        assert process.poll() is None and time.time() < deadline, "crafting ended before the first shard"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = {path: path.stat().st_mtime_ns for path in shards.glob("shard-*.arrow")}
    assert 1 <= len(done) < 6 and not (tmp_path / "results.json").exists()

    run_recipe("protect.py", _args(tiny_source_run, tmp_path))
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in done.items()), "finished shards were redone"
    assert _image_bytes(tmp_path) == _image_bytes(one_process)


def test_unknown_dataset_fails_with_a_clear_message(loopback_hub, tiny_source_run, tmp_path):
    args = _args(tiny_source_run, tmp_path)
    args[1] = "nobody/no-such-dataset"
    result = run_recipe("protect.py", args, check=False)
    assert result.returncode != 0
    assert "'nobody/no-such-dataset' was not found on the Hub" in result.stderr


def _protect(checkpoints, output_dir, dataset="cifar10", **overrides):
    args = ProtectArguments(method="sep", steps=1, checkpoints=str(checkpoints), num_models=2, **overrides)
    data = DataArguments(dataset=dataset, max_train_samples=20, max_eval_samples=10)
    return args, data, SourceTrainingConfig(), RunArguments(output_dir=str(output_dir), preset="cpu")


def _push_small(repo_id, label_feature):
    images = [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(6)]
    features = datasets.Features({"img": datasets.Image(), "label": label_feature})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"img": images, "label": [0, 1, 2] * 2},
                                                              features=features)}).push_to_hub(repo_id)


def _published_data_files(repo_id):
    api = HfApi()
    if not api.repo_exists(repo_id, repo_type="dataset"):
        return []
    return [f for f in api.list_repo_files(repo_id, repo_type="dataset") if f.startswith("data/")]


def test_bad_eps_is_rejected():
    for eps in (0, -1, 256):
        with pytest.raises(ValueError, match=r"--eps is in 1/255 units and must be in \(0, 255\]"):
            ProtectArguments(eps=eps)


def test_dataset_without_labels(loopback_hub, unique_repo_id, tiny_source_run, tmp_path, accelerator):
    repo_id = unique_repo_id("no-labels")
    _push_small(repo_id, datasets.Value("int64"))
    with pytest.raises(DatasetError, match=rf"Dataset '{repo_id}' has no ClassLabel column"):
        run_protection(*_protect(tiny_source_run, tmp_path, dataset=repo_id), accelerator)


def test_class_count_mismatch_publishes_nothing(loopback_hub, unique_repo_id, tiny_source_run, tmp_path, accelerator):
    source, target = unique_repo_id("three-classes"), unique_repo_id("three-classes-sep")
    _push_small(source, datasets.ClassLabel(names=["a", "b", "c"]))
    args = _protect(tiny_source_run, tmp_path, dataset=source, push_to_hub=True, hub_dataset_id=target)
    with pytest.raises(ValueError, match="have 10 classes but dataset .* has 3"):
        run_protection(*args, accelerator)
    assert _published_data_files(target) == []


def test_push_without_write_access_publishes_nothing(loopback_hub, unique_repo_id, tiny_source_run, tmp_path,
                                                     accelerator, monkeypatch):
    target = unique_repo_id("read-only-sep")
    monkeypatch.setenv("HF_TOKEN", loopback_hub.read_token)
    args = _protect(tiny_source_run, tmp_path, push_to_hub=True, hub_dataset_id=target)
    with pytest.raises(HubError, match="write access"):
        run_protection(*args, accelerator)
    monkeypatch.setenv("HF_TOKEN", loopback_hub.write_token)
    assert _published_data_files(target) == []
    assert not (tmp_path / "shards").exists(), "crafting started before the write check"
