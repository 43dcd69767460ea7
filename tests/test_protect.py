"""recipes/protect.py: 1 vs 2 processes byte-identical, kill-and-resume, bad input, nothing half-published."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import time

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, launch_command, load_folder, run_recipe
from huggingface_hub import HfApi
from PIL import Image
from transformers import HfArgumentParser

from sep_hf.arguments import RunArguments
from sep_hf.data.load import DatasetError
from sep_hf.data.view import DataArguments
from sep_hf.protect.job import ProtectArguments, run_protection
from sep_hf.protect.methods.sep import SEPArguments
from sep_hf.publish.hub import HubError
from sep_hf.source.recipe import SourceTrainingConfig


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
    # --eps 8.5 is applied as 8/255 (the same bytes) and warned about once, not once per process
    result = run_recipe("protect.py", _args(tiny_source_run, tmp_path, "--eps", "8.5"), num_processes=2)
    assert json.loads((tmp_path / "results.json").read_text())["num_processes"] == 2, result.stdout[-2000:]
    assert result.stderr.count("--eps 8.5 is applied as 8/255") == 1, result.stderr[-3000:]
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


def _protect(checkpoints, output_dir, accelerator, dataset="cifar10", method_args=(), **overrides):
    """A quick run_protection: 20 + 10 images, one SEP step on 2 checkpoints of the tiny run."""
    args = ProtectArguments(**{"method": "sep", **overrides})
    data = DataArguments(dataset=dataset, max_train_samples=20, max_eval_samples=10)
    run = RunArguments(output_dir=str(output_dir), preset="cpu")
    sep = SEPArguments(steps=1, checkpoints=str(checkpoints), num_models=2)
    return run_protection(args, data, SourceTrainingConfig(), run, accelerator, method_args=[sep, *method_args])


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
        _protect(tiny_source_run, tmp_path, accelerator, dataset=repo_id)


def test_class_count_mismatch_publishes_nothing(loopback_hub, unique_repo_id, tiny_source_run, tmp_path, accelerator):
    source, target = unique_repo_id("three-classes"), unique_repo_id("three-classes-sep")
    _push_small(source, datasets.ClassLabel(names=["a", "b", "c"]))
    with pytest.raises(ValueError, match="have 10 classes but dataset .* has 3"):
        _protect(tiny_source_run, tmp_path, accelerator, dataset=source, push_to_hub=True, hub_dataset_id=target)
    assert _published_data_files(target) == []


def test_push_without_write_access_publishes_nothing(loopback_hub, unique_repo_id, tiny_source_run, tmp_path,
                                                     accelerator, monkeypatch):
    target = unique_repo_id("read-only-sep")
    monkeypatch.setenv("HF_TOKEN", loopback_hub.read_token)
    with pytest.raises(HubError, match="write access"):
        _protect(tiny_source_run, tmp_path, accelerator, push_to_hub=True, hub_dataset_id=target)
    monkeypatch.setenv("HF_TOKEN", loopback_hub.write_token)
    assert _published_data_files(target) == []
    assert not (tmp_path / "shards").exists(), "crafting started before the write check"


# ----------------------------------------------------------------------------------------------
# compositions (--method a+b); the budget rules are in tests/test_trust.py

CUDA_KEY = 1234567890123456789


def _pixels(split) -> torch.Tensor:
    """uint8 (N, 3, H, W) of a decoded split's images."""
    return torch.from_numpy(np.stack([np.array(image.convert("RGB")) for image in split["img"]])).permute(0, 3, 1, 2)


def test_composition_crafts_sep_on_the_cuda_output_within_its_budget(loopback_hub, tiny_source_run, tmp_path,
                                                                     accelerator):
    from sep_hf.data.images import quantize
    from sep_hf.protect import get_protection
    from sep_hf.protect.compose import ComposedProtection
    from sep_hf.protect.methods.cuda import CUDAArguments, apply_cuda, cuda_filters

    composed = get_protection("cuda+sep")
    assert issubclass(composed, ComposedProtection) and composed.part_names == ("cuda", "sep")
    assert not composed.protects_all_splits  # CUDA protects the training split only
    results = _protect(tiny_source_run, tmp_path, accelerator, method="cuda+sep",
                       method_args=[CUDAArguments(cuda_key=str(CUDA_KEY))])
    assert results["protected_splits"] == ["train"] and results["eps"] is None
    assert [(part["method"], part["eps"]) for part in results["parts"]] == [("cuda", None), ("sep", 8)]
    assert results["parts"][1]["checkpoints"]["epochs"] == [5, 10]  # 2 of the tiny run's 4, built from its flags

    protected = datasets.load_dataset(str(tmp_path / "dataset"))
    clean = datasets.load_dataset("uoft-cs/cifar10")
    clean_train = clean["train"].select(range(20))
    cuda = quantize(apply_cuda(_pixels(clean_train).float() / 255, torch.tensor(clean_train["label"]),
                               cuda_filters(CUDA_KEY, 10))).int()
    ours = _pixels(protected["train"]).int()
    sep_change = (ours - cuda).abs()
    assert 0 < sep_change.max() <= 8, "the SEP part must stay within eps of the CUDA output"
    assert sep_change.float().mean() > 1, "the SEP part changed (almost) nothing"
    assert (ours - _pixels(clean_train).int()).abs().max() > 8, "the CUDA part is missing"
    assert torch.equal(_pixels(protected["test"]), _pixels(clean["test"].select(range(10))))
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert "composition `cuda+sep`" in card and "`sep`, L-inf budget eps = 8/255" in card and "`cuda`" in card


def test_composition_refuses_a_part_beyond_its_budget():
    from sep_hf.protect import get_protection
    from sep_hf.protect.base import ProtectionTransform
    from sep_hf.protect.methods.cuda import CUDATransform

    class Overshoot(ProtectionTransform):
        name = "overshoot"

        def __init__(self, levels):
            super().__init__("img", "label")
            self.config, self.levels = type("Config", (), {"eps": 2 / 255})(), levels

        def protect(self, images, labels, indices):
            return (images + self.levels / 255).clamp(0, 1)

    images, labels = torch.full((2, 3, 8, 8), 0.25), torch.tensor([0, 1])
    composed = get_protection("cuda+sep")
    within = composed([CUDATransform(CUDA_KEY, 10), Overshoot(2)], "img", "label")
    assert within.protect(images, labels, torch.arange(2)).shape == images.shape
    beyond = composed([CUDATransform(CUDA_KEY, 10), Overshoot(3)], "img", "label")
    with pytest.raises(AssertionError, match=r"overshoot changed a pixel by 3/255, beyond its budget 2/255"):
        beyond.protect(images, labels, torch.arange(2))


def test_flags_of_another_method_are_refused_before_compute():
    """--method sep --craft_transforms jpeg would craft plain SEP labelled as asked: refused, as defenses do."""
    from sep_hf.protect import check_method_flags, protection_arguments

    parser = HfArgumentParser(protection_arguments())

    def flags(*argv):
        return parser.parse_args_into_dataclasses(list(argv))

    with pytest.raises(ValueError, match="--craft_transforms only applies to --method sep-robust, not sep"):
        check_method_flags("sep", flags("--craft_transforms", "jpeg"))
    check_method_flags("sep-robust", flags("--craft_transforms", "jpeg", "--steps", "3"))  # robust reads SEP's flags too
    check_method_flags("cuda+sep", flags("--cuda_key", "7", "--steps", "3"))  # a composition reads its parts'
    with pytest.raises(ValueError, match="--steps only applies to --method sep"):
        check_method_flags("cuda", flags("--steps", "3"))


# ----------------------------------------------------------------------------------------------
# refused before compute, and nothing half-written (issue 34); tiny folders drawn here, no shared data

CLASSES = ("cat", "dog", "fox")


def _photo_folder(folder, per_class=4, size=16, metadata=False):
    """train/ and test/ of ``per_class`` random ``size`` px PNGs per class: class folders, or (``metadata``) the
    images side by side with a metadata.jsonl naming each one's class, the layout the datasets docs recommend."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        rows = []
        for name in CLASSES:
            for index in range(per_class):
                file = f"{name}-{index}.png" if metadata else f"{name}/{index}.png"
                (folder / split / file).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / split / file)
                rows.append({"file_name": file, "label": name})
        if metadata:
            (folder / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _cuda_protect(dataset, output_dir, accelerator, **overrides):
    """A model-free protection (CUDA) of a tiny folder: the whole job in a second or two."""
    from sep_hf.protect.methods.cuda import CUDAArguments

    args = ProtectArguments(**{"method": "cuda", **overrides})
    run = RunArguments(output_dir=str(output_dir), preset="cpu")
    return run_protection(args, DataArguments(dataset=str(dataset)), SourceTrainingConfig(), run, accelerator,
                          method_args=[CUDAArguments(cuda_key=str(CUDA_KEY))])


@pytest.mark.parametrize("flag", ["shard_size", "craft_batch_size"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_shard_and_batch_sizes_must_be_positive_whole_numbers(flag, value):
    with pytest.raises(ValueError, match=rf"--{flag} must be a positive whole number, got {value!r}"):
        ProtectArguments(**{flag: value})


def test_zero_shard_size_is_one_line_before_compute(tmp_path, capsys):
    from sep_hf import cli

    folder, output_dir = _photo_folder(tmp_path / "photos"), tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["protect", "--dataset", str(folder), "--shard_size", "0", "--output_dir", str(output_dir)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "--shard_size" in lines[0], lines
    assert not output_dir.exists()


def test_more_models_than_the_source_keeps_is_refused_before_training(tmp_path, accelerator):
    folder = _photo_folder(tmp_path / "photos")

    def protect(output_dir, method, preset, sep, **source):
        run = RunArguments(output_dir=str(output_dir), preset=preset)
        source = SourceTrainingConfig(**{"model": "smallnet_cifar", "epochs": 10, **source})
        run_protection(ProtectArguments(method=method), DataArguments(dataset=str(folder)), source, run, accelerator,
                       method_args=[sep])

    cases = [  # (method, preset, SEP's flags, the source's flags, the refusal)
        ("sep", "cpu", SEPArguments(num_models=7), {}, r"--num_models 7\) .* the 6 checkpoints .*--num_checkpoints 6"),
        ("sep-fa-vr", "paper", SEPArguments(), {"num_checkpoints": 10},
         r"15 checkpoints \(--preset paper's --num_models for sep-fa-vr\) .* the 10 checkpoints"),
        ("sep", "cpu", SEPArguments(num_models=4), {"epochs": 3}, r"--num_models 4\) .* the 3 checkpoints .*--epochs 3"),
        ("sep", "cpu", SEPArguments(num_models=0), {}, r"--num_models must be a positive whole number, got 0"),
    ]
    for index, (method, preset, sep, source, refusal) in enumerate(cases):
        output_dir = tmp_path / f"run{index}"
        with pytest.raises(ValueError, match=refusal):
            protect(output_dir, method, preset, sep, **source)
        assert not (output_dir / "source").exists(), f"case {index}: the source was trained before the refusal"


def test_output_folder_that_cannot_be_written_is_refused_before_compute(tmp_path, accelerator):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    # the dataset does not exist: any work before the check would fail on it instead
    targets = [blocker / "out"] + ([read_only / "out"] if os.geteuid() != 0 else [])  # root writes anywhere
    for output_dir in targets:
        with pytest.raises(ValueError, match=rf"Output folder {output_dir} cannot be written.*--output_dir"):
            _cuda_protect(tmp_path / "no-such-dataset", output_dir, accelerator)


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_publishing_keeps_the_previous_dataset_whole(tmp_path, accelerator, monkeypatch):
    folder, output_dir = _photo_folder(tmp_path / "photos"), tmp_path / "out"
    _cuda_protect(folder, output_dir, accelerator)
    published = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (output_dir / "dataset").rglob("*")
                 if path.is_file()}

    def half_written_parquet(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PAR1 truncated")
        _full_disk()

    monkeypatch.setattr(datasets.Dataset, "to_parquet", half_written_parquet)
    with pytest.raises(OSError, match="No space left"):
        _cuda_protect(folder, output_dir, accelerator, protection_seed=1)
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (output_dir / "dataset").rglob("*")
            if path.is_file()} == published, "the published folder was changed in place"
    assert sorted(path.name for path in output_dir.iterdir() if path.name.startswith(".")) == []


def test_full_disk_while_crafting_leaves_no_temporary_shard(tmp_path, accelerator, monkeypatch):
    from datasets.arrow_writer import ArrowWriter

    folder, output_dir = _photo_folder(tmp_path / "photos"), tmp_path / "out"
    stale = output_dir / "shards" / "train" / ".partial-0" / "tmp-of-a-killed-run"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a shard")
    finalize = ArrowWriter.finalize

    def full_disk_in_shards(writer, *args, **kwargs):  # datasets' own clean-up finalizes too: it fails again
        if "shards" in str(writer._path):
            _full_disk()
        return finalize(writer, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "finalize", full_disk_in_shards)
    with pytest.raises(OSError, match="No space left"):
        _cuda_protect(folder, output_dir, accelerator)
    assert [path.name for path in (output_dir / "shards" / "train").rglob("*")] == []
    monkeypatch.setattr(ArrowWriter, "finalize", finalize)
    _cuda_protect(folder, output_dir, accelerator)
    assert [path.name for path in (output_dir / "shards" / "train").iterdir()][0].startswith("shard-00000-of-00001")


def test_full_disk_is_one_line_naming_the_output_folder(tmp_path, capsys, monkeypatch):
    from sep_hf import cli

    monkeypatch.setattr(cli, "_accelerator", lambda run_args: None)
    monkeypatch.setattr(cli, "run_protection", _full_disk)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["protect", "--dataset", "cifar10", "--output_dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert f"No space left on the device of {tmp_path / 'out'}" in lines[0] and "--output_dir" in lines[0]


def test_class_names_in_metadata_are_published_as_a_class_label_the_card_states(tmp_path, accelerator):
    folder = _photo_folder(tmp_path / "photos", metadata=True)
    results = _cuda_protect(folder, tmp_path / "out", accelerator)
    assert results["class_encoded"] == {"column": "label", "names": list(CLASSES)}
    published = load_folder(tmp_path / "out" / "dataset")
    assert published["train"].features["label"].names == list(CLASSES)  # sorted, as class_encode_column orders them
    assert published["train"]["label"] == [0] * 4 + [1] * 4 + [2] * 4
    card = (tmp_path / "out" / "dataset" / "README.md").read_text()
    assert "class names in `label`" in card and "`class_encode_column`" in card and "0 = cat, 1 = dog, 2 = fox" in card


@pytest.mark.parametrize("last_accuracy, warned", [(0.12, True), (0.6, False)])
def test_a_source_near_chance_is_warned_about_before_crafting_and_on_the_card(loopback_hub, tiny_source_run, tmp_path,
                                                                             accelerator, caplog, last_accuracy, warned):
    """The checkpoints' records carry the source's held-out accuracy: the card states it per kept checkpoint, and a
    last checkpoint near chance (10 classes: below 0.19) is a warning before crafting and on the card."""
    import logging
    import shutil

    from sep_hf.source.checkpoints import list_checkpoints

    run = tmp_path / "source"
    shutil.copytree(tiny_source_run, run)
    checkpoints = list_checkpoints(run)
    for checkpoint in checkpoints:  # the records are metadata: only the weights' hashes are verified
        record_file = checkpoint.path / "record.json"
        record = json.loads(record_file.read_text())
        record["clean_test_accuracy"] = last_accuracy if checkpoint is checkpoints[-1] else 0.5
        record_file.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        results = _protect(run, tmp_path / "out", accelerator, audit_model="none")
    held_out = results["checkpoints"]["held_out_accuracy"]
    assert held_out["accuracy"][-1] == last_accuracy and held_out["chance"] == 0.1
    assert ("Before crafting: the source model's held-out accuracy is" in caplog.text) is warned
    card = (tmp_path / "out" / "dataset" / "README.md").read_text()
    assert f"at the kept checkpoints: 0.5000, {last_accuracy:.4f}" in card
    assert ("**Warning**: the source model's held-out accuracy is 0.1200, near chance (0.1000)" in card) is warned
