"""The user's whole job through the loopback Hub: protect.py publishes, train_victim.py reports."""
from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
from conftest import HUB_WRITE_TOKEN, files_containing, hub_repo_containing, load_folder, run_recipe
from huggingface_hub import DatasetCard, HfApi, ModelCard

TOY = ["--preset", "cpu", "--max_train_samples", 200, "--max_eval_samples", 50]


@pytest.fixture(scope="module")
def published(loopback_hub, tmp_path_factory):
    """protect.py with no checkpoints: trains the source, pushes it, crafts, publishes the dataset."""
    from conftest import make_unique_repo_id

    repo_id = make_unique_repo_id("cifar10-sep")
    output_dir = tmp_path_factory.mktemp("protect-e2e")
    result = run_recipe("protect.py", ["--dataset", "cifar10", *TOY, "--epochs", 2, "--num_checkpoints", 2,
                                       "--batch_size", 50, "--steps", 2, "--output_dir", output_dir, "--push_to_hub",
                                       "--hub_dataset_id", repo_id])
    return repo_id, output_dir, result


@pytest.fixture(scope="module")
def victim(published, tmp_path_factory):
    from conftest import make_unique_repo_id

    repo_id = published[0]
    victim_id = make_unique_repo_id("cifar10-sep-victim")
    output_dir = tmp_path_factory.mktemp("victim-e2e")
    result = run_recipe("train_victim.py", ["--dataset", repo_id, "--eval_dataset", "cifar10", "--model",
                                            "smallnet_cifar", *TOY, "--epochs", 2, "--batch_size", 50, "--output_dir",
                                            output_dir, "--push_to_hub", "--hub_model_id", victim_id,
                                            "--update_dataset_card", "--clean_reference_accuracy", 0.79])
    return victim_id, output_dir, result


def test_protected_dataset_is_a_drop_in_replacement(published):
    repo_id, output_dir, _ = published
    protected, clean = datasets.load_dataset(repo_id), datasets.load_dataset("uoft-cs/cifar10")
    assert set(protected) == {"train", "test"} and protected["train"].num_rows == 200
    assert protected["train"].features == clean["train"].features
    local = load_folder(output_dir / "dataset")
    for row, local_row in zip(protected["train"].select(range(20)), local["train"].select(range(20))):
        assert np.array_equal(np.asarray(row["img"]), np.asarray(local_row["img"]))


def test_no_published_image_equals_its_clean_original(published):
    repo_id = published[0]
    protected = datasets.load_dataset(repo_id, split="train")
    clean = datasets.load_dataset("uoft-cs/cifar10", split="train").select(range(protected.num_rows))
    assert protected["label"] == clean["label"]
    for ours, theirs in zip(protected, clean):
        diff = np.abs(np.asarray(ours["img"], dtype=int) - np.asarray(theirs["img"].convert("RGB"), dtype=int))
        assert 0 < diff.max() <= 8


def test_source_checkpoints_were_pushed_private(published):
    repo_id, output_dir, _ = published
    source = f"{repo_id}-source"
    assert HfApi().model_info(source).private is True
    results = json.loads((output_dir / "results.json").read_text())
    assert results["checkpoints"]["source"] == source and len(results["checkpoints"]["revision"]) == 40
    assert {"source_training", "crafting", "publishing"} <= set(results["wall_seconds"])


def test_dataset_card_states_method_eps_grid(published):
    repo_id = published[0]
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert "sample_grid.png" in files and "README.md" in files
    card = DatasetCard.load(repo_id)
    assert "eps = 8/255" in card.text and "sample_grid.png" in card.text and "sep-fa-vr" in card.text


def test_no_secret_reaches_the_outputs_the_hub_or_the_logs(published, victim, tmp_path):
    """The token the recipes pushed with (HF_TOKEN, inherited by every process) appears nowhere they wrote."""
    token = os.environ["HF_TOKEN"]
    assert token == HUB_WRITE_TOKEN and HfApi().whoami()["name"], "HF_TOKEN is not the token the runs used"
    needle = token.encode()
    planted = tmp_path / "planted" / "results.json"  # the scan itself finds the token when it is there
    planted.parent.mkdir()
    planted.write_text(json.dumps({"hub": {"token": token}}))
    assert files_containing(planted.parent, needle) == [str(planted)]
    (repo_id, protect_dir, protect_run), (victim_id, victim_dir, victim_run) = published, victim
    for run in (protect_run, victim_run):
        assert token not in run.stdout + run.stderr, "the token reached the logs"
    assert files_containing(protect_dir, needle) == [] and files_containing(victim_dir, needle) == []
    for hub_repo, repo_type in ((repo_id, "dataset"), (f"{repo_id}-source", "model"), (victim_id, "model")):
        assert hub_repo_containing(hub_repo, repo_type, needle, tmp_path / "hub") == [], hub_repo


def test_victim_card_reports_clean_accuracy(victim, published):
    victim_id, output_dir, _ = victim
    results = json.loads((output_dir / "results.json").read_text())
    card = ModelCard.load(victim_id)
    (result,) = card.data.eval_results
    assert result.metric_type == "accuracy"
    assert result.metric_value == pytest.approx(results["eval_accuracy"], abs=1e-4)
    assert results["eval_accuracy"] == results["history"][-1]["eval_accuracy"]  # the final model's evaluation
    assert results["num_eval"] == 50
    assert result.dataset_type == "uoft-cs/cifar10" and result.dataset_split == "test"
    assert published[0] in card.text and "0.7900" in card.text
    assert {"config.json", "model.safetensors", "training_curve.png"} <= set(HfApi().list_repo_files(victim_id))
    assert len(results["history"]) == 2 and results["dataset_revision"]


def test_victim_loads_with_auto_classes_and_reproduces_its_accuracy(victim):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import sep_hf.models  # noqa: F401

    victim_id, output_dir, _ = victim
    model = AutoModelForImageClassification.from_pretrained(victim_id).eval()
    processor = AutoImageProcessor.from_pretrained(victim_id)
    test = datasets.load_dataset("uoft-cs/cifar10", split="test").select(range(50))  # the clean split it was evaluated on
    with torch.no_grad():
        logits = model(**processor(list(test["img"]), return_tensors="pt")).logits
    assert logits.shape == (50, 10)
    correct = (logits.argmax(1) == torch.tensor(list(test["label"]))).sum().item()
    reported = json.loads((output_dir / "results.json").read_text())["eval_accuracy"] * 50
    assert abs(correct - reported) <= 1, f"the pushed model gets {correct}/50, the card says {reported:g}/50"


def test_dataset_card_victim_table_is_filled(victim, published):
    repo_id = published[0]
    victim_id, output_dir, _ = victim
    accuracy = json.loads((output_dir / "results.json").read_text())["eval_accuracy"]
    card = DatasetCard.load(repo_id)
    (row,) = card.data.get("sep_hf_victims")
    assert row["hub_model_id"] == victim_id and row["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert f"| {accuracy:.4f} | {victim_id} |" in card.text
