"""The user's whole job through the loopback Hub: protect.py publishes, train_victim.py reports."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from huggingface_hub import DatasetCard, HfApi, ModelCard

from conftest import run_recipe

TOY = ["--preset", "cpu", "--max_train_samples", 200, "--max_eval_samples", 50]


@pytest.fixture(scope="module")
def published(loopback_hub, tmp_path_factory):
    """protect.py with no checkpoints: trains the source, pushes it, crafts, publishes the dataset."""
    from conftest import make_unique_repo_id

    repo_id = make_unique_repo_id("cifar10-sep")
    output_dir = tmp_path_factory.mktemp("protect-e2e")
    run_recipe("protect.py", ["--dataset", "cifar10", *TOY, "--epochs", 2, "--num_checkpoints", 2, "--batch_size", 50,
                              "--steps", 2, "--output_dir", output_dir, "--push_to_hub", "--hub_dataset_id", repo_id])
    return repo_id, output_dir


@pytest.fixture(scope="module")
def victim(published, tmp_path_factory):
    from conftest import make_unique_repo_id

    repo_id, _ = published
    victim_id = make_unique_repo_id("cifar10-sep-victim")
    output_dir = tmp_path_factory.mktemp("victim-e2e")
    run_recipe("train_victim.py", ["--dataset", repo_id, "--eval_dataset", "cifar10", "--model", "smallnet_cifar", *TOY,
                                   "--epochs", 2, "--batch_size", 50, "--output_dir", output_dir, "--push_to_hub",
                                   "--hub_model_id", victim_id, "--update_dataset_card",
                                   "--clean_reference_accuracy", 0.79])
    return victim_id, output_dir


def test_protected_dataset_is_a_drop_in_replacement(published):
    repo_id, output_dir = published
    protected, clean = datasets.load_dataset(repo_id), datasets.load_dataset("uoft-cs/cifar10")
    assert set(protected) == {"train", "test"} and protected["train"].num_rows == 200
    assert protected["train"].features == clean["train"].features
    local = datasets.load_dataset(str(output_dir / "dataset"))
    for row, local_row in zip(protected["train"].select(range(20)), local["train"].select(range(20))):
        assert np.array_equal(np.asarray(row["img"]), np.asarray(local_row["img"]))


def test_no_published_image_equals_its_clean_original(published):
    repo_id, _ = published
    protected = datasets.load_dataset(repo_id, split="train")
    clean = datasets.load_dataset("uoft-cs/cifar10", split="train").select(range(protected.num_rows))
    assert protected["label"] == clean["label"]
    for ours, theirs in zip(protected, clean):
        diff = np.abs(np.asarray(ours["img"], dtype=int) - np.asarray(theirs["img"].convert("RGB"), dtype=int))
        assert 0 < diff.max() <= 8


def test_source_checkpoints_were_pushed_private(published):
    repo_id, output_dir = published
    source = f"{repo_id}-source"
    assert HfApi().model_info(source).private is True
    results = json.loads((output_dir / "results.json").read_text())
    assert results["checkpoints"]["source"] == source and len(results["checkpoints"]["revision"]) == 40
    assert {"source_training", "crafting", "publishing"} <= set(results["wall_seconds"])


def test_dataset_card_states_method_eps_grid(published):
    repo_id, _ = published
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert "sample_grid.png" in files and "README.md" in files
    card = DatasetCard.load(repo_id)
    assert "eps = 8/255" in card.text and "sample_grid.png" in card.text and "sep-fa-vr" in card.text
    assert "hf_" not in card.text.lower() and "token" not in card.text.lower()  # nothing secret leaks


def test_victim_card_reports_clean_accuracy(victim, published):
    victim_id, output_dir = victim
    results = json.loads((output_dir / "results.json").read_text())
    card = ModelCard.load(victim_id)
    (result,) = card.data.eval_results
    assert result.metric_type == "accuracy" and 0.0 <= result.metric_value <= 1.0
    assert result.metric_value == pytest.approx(results["eval_accuracy"], abs=1e-4)
    assert result.dataset_type == "uoft-cs/cifar10" and result.dataset_split == "test"
    assert published[0] in card.text and "0.7900" in card.text
    assert {"config.json", "model.safetensors", "training_curve.png"} <= set(HfApi().list_repo_files(victim_id))
    assert len(results["history"]) == 2 and results["dataset_revision"]


def test_victim_loads_with_auto_classes(victim):
    import sep_hf.models  # noqa: F401
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    victim_id, _ = victim
    model = AutoModelForImageClassification.from_pretrained(victim_id)
    processor = AutoImageProcessor.from_pretrained(victim_id)
    image = datasets.load_dataset("uoft-cs/cifar10", split="test")[0]["img"]
    logits = model(**processor(image, return_tensors="pt")).logits
    assert logits.shape == (1, 10)


def test_dataset_card_victim_table_is_filled(victim, published):
    repo_id, _ = published
    card = DatasetCard.load(repo_id)
    (row,) = card.data.get("sep_hf_victims")
    assert row["hub_model_id"] == victim[0] and 0.0 <= row["eval_accuracy"] <= 1.0
    assert f"| {victim[0]} |" in card.text
