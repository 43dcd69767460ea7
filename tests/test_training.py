"""Source training: schedule, batched augmentation, multi-process runs, kill-and-resume, Hub push."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, launch_command, run_recipe
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file

from sep_hf import CheckpointEnsemble, CheckpointError
from sep_hf.source.augment import augment_crop_flip
from sep_hf.source.checkpoints import evenly_spaced, list_checkpoints
from sep_hf.source.recipe import SourceTrainingConfig

# A few hundred images through the loopback Hub: 8 epochs, checkpoints at 2, 4, 6, 8.
RECIPE_ARGS = ["--dataset", "cifar10", "--preset", "cpu", "--max_train_samples", 400, "--max_eval_samples", 100,
               "--batch_size", 50, "--epochs", 8, "--num-checkpoints", 4, "--seed", 3]


def test_checkpoint_schedule():
    def epochs(epochs, num_checkpoints):
        return SourceTrainingConfig(epochs=epochs, num_checkpoints=num_checkpoints).checkpoint_epochs()

    assert epochs(120, 15) == list(range(8, 121, 8))
    assert epochs(12, 6) == [2, 4, 6, 8, 10, 12]
    assert epochs(5, 0) == epochs(5, 9) == [1, 2, 3, 4, 5]  # 0, or more than the epochs: every epoch
    # the same picker chooses the checkpoints an ensemble loads
    assert evenly_spaced(list(range(1, 16)), 5) == [3, 6, 9, 12, 15]
    assert evenly_spaced(["a", "b", "c"], None) == ["a", "b", "c"]
    with pytest.raises(CheckpointError, match=r"Asked for 7 checkpoints \(--num_models\) but 6"):
        evenly_spaced(list(range(6)), 7)


def test_augmentation_is_a_flipped_crop_of_each_image():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = augment_crop_flip(images, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for original, augmented in zip(images, out):
        candidates = []
        for view in (original, original.flip(2)):
            padded = F.pad(view[None].float(), (2,) * 4, mode="reflect")[0].to(torch.uint8)
            candidates += [padded[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(augmented, c) for c in candidates)
    assert not torch.equal(out, images)


@pytest.fixture(scope="module")
def uninterrupted_run(loopback_hub, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("source-1proc")
    run_recipe("train_source.py", RECIPE_ARGS + ["--output_dir", output_dir])
    return output_dir


def _final_weights(output_dir):
    return load_file(list_checkpoints(output_dir)[-1].path / "model.safetensors")


@pytest.fixture(scope="module")
def eval_split():
    """The 100 clean test images the recipe runs evaluate on."""
    from conftest import CIFAR10_DIR

    from sep_hf.data.view import DataArguments, load_training_data

    data = load_training_data(DataArguments(dataset=str(CIFAR10_DIR), max_train_samples=100, max_eval_samples=100))
    return data.eval_images, data.eval_labels


def _recorded_and_recomputed_accuracy(output_dir, eval_split, accelerator):
    """Each checkpoint's recorded clean accuracy, and the one its saved weights give (the run's own function)."""
    from sep_hf.models import model_from_config
    from sep_hf.source.train import evaluate_accuracy

    pairs = []
    for checkpoint in list_checkpoints(output_dir):
        model = model_from_config(checkpoint.record["model"])
        model.load_state_dict(checkpoint.load_state_dict())
        model = model.to(memory_format=torch.channels_last)
        pairs.append((checkpoint.record["clean_test_accuracy"], evaluate_accuracy(model, *eval_split, accelerator)))
    return pairs


def test_one_process_run_writes_checkpoints_and_results(uninterrupted_run, eval_split, accelerator):
    results = json.loads((uninterrupted_run / "results.json").read_text())
    assert results["checkpoints"] == [2, 4, 6, 8] and results["train_seconds"] > 0
    history = results["history"]
    # 400 images, 8 epochs: 0.21 on this machine (chance: 0.10); loss and accuracy improve
    assert results["clean_test_accuracy"] == history[-1]["clean_test_accuracy"] >= 0.15
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["clean_test_accuracy"] > history[0]["clean_test_accuracy"]
    for recorded, recomputed in _recorded_and_recomputed_accuracy(uninterrupted_run, eval_split, accelerator):
        assert recomputed == pytest.approx(recorded, abs=0.011), "the saved weights are not the evaluated ones"
    record = list_checkpoints(uninterrupted_run)[0].record
    assert record["dataset"]["id"] == "uoft-cs/cifar10" and len(record["dataset"]["revision"]) == 40
    assert record["model"]["model_name"] == "smallnet_cifar" and len(record["class_names"]) == 10
    assert {"epoch", "step", "train_loss", "clean_test_accuracy", "normalization"} <= set(record)
    assert (uninterrupted_run / "README.md").exists() and (uninterrupted_run / "training_curve.png").exists()


@pytest.mark.slow
def test_two_processes_write_the_same_checkpoint_set(uninterrupted_run, eval_split, accelerator, tmp_path):
    """Two processes: the same checkpoint set, values that are the trained model's, and an exact resume.

    The values cannot equal the one-process run's: each process normalizes its half of the batch
    with its own BatchNorm statistics, so the trajectories differ from the first step (measured:
    max relative difference above 1 at every checkpoint). What must hold exactly is checked instead.
    """
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_recipe("train_source.py", RECIPE_ARGS + ["--output_dir", full], num_processes=2)
    one, two = list_checkpoints(uninterrupted_run), list_checkpoints(full)
    assert [c.epoch for c in two] == [c.epoch for c in one] == [2, 4, 6, 8]
    assert two[0].record["num_processes"] == 2
    for a, b in zip(one, two):
        wa, wb = a.load_state_dict(), b.load_state_dict()
        assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
    # the saved values are the model each checkpoint's record evaluated
    for recorded, recomputed in _recorded_and_recomputed_accuracy(full, eval_split, accelerator):
        assert recomputed == pytest.approx(recorded, abs=0.011), "the saved weights are not the evaluated ones"
    assert two[-1].record["clean_test_accuracy"] >= 0.15  # the two processes learn together (chance: 0.10)
    # a two-process run resumed from its epoch-6 checkpoint writes the same epoch-8 values, bit for bit
    shutil.copytree(full / "checkpoints", resumed / "checkpoints", ignore=shutil.ignore_patterns("epoch-008"))
    run_recipe("train_source.py", RECIPE_ARGS + ["--output_dir", resumed], num_processes=2)
    expected, actual = _final_weights(full), _final_weights(resumed)
    assert expected.keys() == actual.keys() and [c.epoch for c in list_checkpoints(resumed)] == [2, 4, 6, 8]
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after a two-process resume"
    epoch_6 = two[-2].load_state_dict()
    assert not all(torch.equal(value, epoch_6[name]) for name, value in expected.items()), \
        "epochs 7 and 8 changed nothing: the comparison is void"
    ensemble = CheckpointEnsemble.from_pretrained(full)
    assert ensemble.num_models == 4 and ensemble.predict(torch.rand(3, 3, 32, 32)).shape == (4, 3)


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(uninterrupted_run, tmp_path):
    process = subprocess.Popen(launch_command("train_source.py", RECIPE_ARGS + ["--output_dir", tmp_path]),
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "epoch-002").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before checkpoint 2"
        time.sleep(0.01)
    import os
    import signal

    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its training process
    process.wait()
    assert [c.epoch for c in list_checkpoints(tmp_path)] == [2]

    resumed = run_recipe("train_source.py", RECIPE_ARGS + ["--output_dir", tmp_path])
    output = resumed.stdout + resumed.stderr
    assert "(epoch 2)" in output and "epoch 1/8" not in output and "epoch 2/8" not in output
    assert "epoch 3/8" in output
    expected, actual = _final_weights(uninterrupted_run), _final_weights(tmp_path)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"


@pytest.mark.slow
def test_push_to_private_repo_then_resume_from_hub(loopback_hub, unique_repo_id, tmp_path):
    repo_id = unique_repo_id("source")
    args = RECIPE_ARGS + ["--epochs", 4, "--num_checkpoints", 2, "--output_dir", tmp_path,
                          "--push_to_hub", "--hub_model_id", repo_id]
    run_recipe("train_source.py", args)
    api = HfApi()
    assert api.model_info(repo_id).private is True
    files = set(api.list_repo_files(repo_id))
    assert {"README.md", "training_curve.png", "results.json", "checkpoints/epoch-004/model.safetensors",
            "checkpoints/epoch-002/record.json", "checkpoints/epoch-002/training_state.pt"} <= files
    card = ModelCard.load(repo_id)
    assert "| 4 |" in card.text and card.data.eval_results[0].metric_type == "accuracy"
    with pytest.raises(HfHubHTTPError):
        api.model_info(repo_id, token=False)  # private: invisible without a token

    ensemble = CheckpointEnsemble.from_pretrained(repo_id, num_models=2)
    assert ensemble.epochs == [2, 4] and ensemble.revision == api.model_info(repo_id).sha
    local = CheckpointEnsemble.from_pretrained(tmp_path, num_models=2)
    for a, b in zip(ensemble.models, local.models):
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(pa, pb), name

    shutil.rmtree(tmp_path)  # local run gone: the same command resumes from the Hub repo
    resumed = run_recipe("train_source.py", args)
    output = resumed.stdout + resumed.stderr
    assert "(epoch 4)" in output and "epoch 1/4" not in output
    assert [c.epoch for c in list_checkpoints(tmp_path)] == [2, 4]


def test_public_repo_when_asked(loopback_hub, unique_repo_id, tmp_path):
    from sep_hf.publish.hub import ensure_repo

    public, private = unique_repo_id("public"), unique_repo_id("private")
    ensure_repo(public, private=False)
    ensure_repo(private)
    assert HfApi().model_info(public).private is False and HfApi().model_info(private).private is True


def test_ensemble_rejects_mixed_architectures(tiny_source_run, tmp_path):
    shutil.copytree(tiny_source_run / "checkpoints", tmp_path / "checkpoints")
    record_path = list_checkpoints(tmp_path)[-1].path / "record.json"
    record = json.loads(record_path.read_text())
    record["model"]["num_classes"] = 100
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="num_classes=100.*one architecture and class count"):
        CheckpointEnsemble.from_pretrained(tmp_path)


def test_corrupted_checkpoint_is_never_loaded(tiny_source_run, tmp_path):
    from sep_hf.source.job import find_resume_checkpoint

    shutil.copytree(tiny_source_run / "checkpoints", tmp_path / "checkpoints")
    *_, before_last, last = list_checkpoints(tmp_path)
    weights = last.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated, as by a crash mid-copy
    (tmp_path / "checkpoints" / ".epoch-099.partial").mkdir()  # staging folder of a killed save
    assert find_resume_checkpoint(tmp_path).epoch == before_last.epoch
    with pytest.raises(CheckpointError, match="corrupted"):
        CheckpointEnsemble.from_pretrained(tmp_path)


def test_hub_checkpoints_are_ordered_by_epoch_number(loopback_hub, unique_repo_id, tiny_source_run, tmp_path):
    """epoch-1000 comes after epoch-999 (a string sort would put it first and pick epoch-999 as the last)."""
    repo_id = unique_repo_id("long-source")
    staged = tmp_path / "staged" / "checkpoints"
    sources = list_checkpoints(tiny_source_run)[-3:]
    for epoch, checkpoint in zip((998, 999, 1000), sources):
        target = staged / f"epoch-{epoch}"
        target.mkdir(parents=True)
        shutil.copy(checkpoint.path / "model.safetensors", target / "model.safetensors")
        record = {**checkpoint.record, "epoch": epoch}
        record["files"] = {"model.safetensors": checkpoint.record["files"]["model.safetensors"]}
        (target / "record.json").write_text(json.dumps(record))
    api = HfApi()
    api.create_repo(repo_id, private=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(staged.parent))

    last = CheckpointEnsemble.from_pretrained(repo_id, num_models=1)
    assert last.epochs == [1000]
    expected = sources[-1].load_state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in last.models[0].state_dict().items())
    assert CheckpointEnsemble.from_pretrained(repo_id, num_models=2).epochs == [999, 1000]
    assert CheckpointEnsemble.from_pretrained(repo_id).epochs == [998, 999, 1000]


@pytest.mark.parametrize("path", ["./no/such/dir", "no/such/dir", "~/no-such-dir"])
def test_mistyped_local_checkpoints_path_says_it_does_not_exist(path):
    with pytest.raises(CheckpointError, match=f"Checkpoint folder '{path}' does not exist"):
        CheckpointEnsemble.from_pretrained(path)


def _random_data(num_train, num_eval=6, size=16, classes=3, seed=0):
    """Random uint8 images of ``classes`` classes in the models' view: a tiny dataset, no files."""
    from sep_hf.data.view import TrainingData

    images = torch.randint(0, 256, (num_train + num_eval, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(num_train + num_eval) % classes
    return TrainingData(images[:num_train], labels[:num_train], images[num_train:], labels[num_train:],
                        tuple(f"class{index}" for index in range(classes)), "random", None)


def test_dataset_smaller_than_the_batch_trains_one_smaller_batch_per_epoch(tmp_path, accelerator, caplog):
    """108 photos with the preset's --batch_size 128: one batch of 108 per epoch, as a DataLoader gives a short
    dataset, with a warning; the resume stays bit-identical."""
    from sep_hf.source.train import train_source
    from sep_hf.utils.presets import apply_preset

    config = SourceTrainingConfig(model="smallnet_cifar", epochs=2, batch_size=16, num_checkpoints=0)
    apply_preset("cpu", config)
    data = _random_data(12)
    with caplog.at_level("WARNING", logger="sep_hf"):
        results = train_source(config, data, tmp_path / "full", accelerator)
    assert "--batch_size 16 is larger than the 12 training images: each epoch is one batch of 12" in caplog.text
    assert [row["step"] for row in results["history"]] == [1, 2] and results["checkpoints"] == [1, 2]
    first, last = (checkpoint.load_state_dict() for checkpoint in list_checkpoints(tmp_path / "full"))
    assert not all(torch.equal(first[name], last[name]) for name in first), "the second epoch trained nothing"
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "resumed" / "checkpoints",
                    ignore=shutil.ignore_patterns("epoch-002"))
    train_source(config, data, tmp_path / "resumed", accelerator, resume_from=list_checkpoints(tmp_path / "resumed")[0])
    expected, actual = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "resumed")
    assert all(torch.equal(expected[name], actual[name]) for name in expected), "the resume is not bit-identical"


def test_short_batch_is_weighted_as_one_batch_across_processes_and_micro_batches():
    """The loss weight of each micro-batch of a short batch: a mean over the whole global batch once
    accelerate averages over accumulation steps and DDP over processes (full batches: exactly 1)."""
    from sep_hf.source.train import micro_batch_weight

    assert micro_batch_weight(micro=25, batch=100, world=2, accumulation=2) == 1  # a full batch is left as is
    # 107 images on 2 processes with 2 micro-batches each: 27 + 27 and 27 + 26 rows
    weights = [micro_batch_weight(rows, 107, 2, 2) for rows in (27, 27, 27, 26)]
    assert sum(weight / (2 * 2) for weight in weights) == pytest.approx(1)
    assert [weight * 107 / (2 * 2) for weight in weights] == pytest.approx([27, 27, 27, 26])


def test_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, accelerator):
    from sep_hf.arguments import HubArguments, RunArguments
    from sep_hf.data.view import DataArguments
    from sep_hf.source.job import run_source_training

    (tmp_path / "a-file").write_text("not a folder")
    run = RunArguments(output_dir=str(tmp_path / "a-file" / "source"), preset="cpu")
    with pytest.raises(ValueError, match="Output folder .*a-file/source cannot be written"):  # not the missing dataset
        run_source_training(SourceTrainingConfig(), DataArguments(dataset=str(tmp_path / "none")), run, HubArguments(),
                            accelerator)


def test_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from sep_hf.source.checkpoints import save_checkpoint
    from sep_hf.utils.io import OutputError, reporting_full_disk

    write_bytes = Path.write_bytes

    def full_disk_at_the_training_state(path, data):
        if path.name == "training_state.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_at_the_training_state)
    with pytest.raises(OutputError, match=f"No space left on the device of {tmp_path}"), reporting_full_disk(tmp_path):
        save_checkpoint(tmp_path, 1, {"weight": torch.zeros(3)}, {}, {"optimizer": {}})
    assert list((tmp_path / "checkpoints").iterdir()) == []
