"""Victim building blocks: the shipped metric, collator normalization, model init, dataset-card rows."""
from __future__ import annotations

import json
from pathlib import Path

import evaluate
import pytest
import torch
from huggingface_hub import DatasetCard

from sep_hf.publish.cards import add_victim_to_dataset_card, protected_dataset_card
from sep_hf.victim.trainer import ACCURACY_METRIC, VictimCollator, VictimTrainingConfig, build_victim_model


def test_accuracy_metric_loads_offline_and_computes():
    metric = evaluate.load(ACCURACY_METRIC)
    assert metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}


def test_collator_normalizes_like_the_image_processor():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    batch = VictimCollator(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.1])(
        [{"image": image, "label": torch.tensor(i)} for i, image in enumerate(images)])
    expected = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.2, 0.1]).view(1, 3, 1, 1)
    torch.testing.assert_close(batch["pixel_values"], expected)
    assert batch["labels"].tolist() == [0, 1, 2, 3]


def test_victim_model_is_a_timm_wrapper_with_pytorch_default_init():
    config = VictimTrainingConfig(model="smallnet_cifar")
    model = build_victim_model(config, [f"c{i}" for i in range(7)], (32, 32))
    assert type(model).__name__ == "TimmWrapperForImageClassification" and model.config.num_labels == 7
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 7)
    conv = model.timm_model.stem[0]
    # transformers' N(0, 0.02) init would give std 0.02; PyTorch's kaiming-uniform gives ~1/sqrt(3 * fan_in)
    assert conv.weight.std().item() == pytest.approx((1 / (3 * 27)) ** 0.5, rel=0.2)


def test_unknown_defense_is_rejected():
    with pytest.raises(ValueError, match="Unknown defense 'magic'"):
        VictimTrainingConfig(defense="magic")


def _card():
    results = {"eps": 8, "method": "sep", "steps": 10, "step_size": 1.0, "mean_psnr": 35.0,
               "dataset": "uoft-cs/cifar10", "dataset_revision": "b" * 40,
               "splits": {"train": {"num_examples": 10, "max_linf": 8, "mean_psnr": 35.0, "mean_l2": 1.2}},
               "config": {"method": "sep"}}
    method_lines = ["- method: `sep`, L-inf budget eps = 8/255, 10 steps of 1/255",
                    "- checkpoint ensemble: 2 checkpoints (epochs [2, 4]) of `org/src`"]
    data, body = protected_dataset_card(results, method_lines, "grid.png")
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")
    assert all(line in card.text for line in method_lines) and "b" * 40 in card.text
    assert card.data.source_datasets == ["uoft-cs/cifar10"]
    return card


def test_victim_rows_are_added_and_replaced():
    card = _card()
    assert "No victim has been trained" in card.text
    row = {"model": "smallnet_cifar", "defense": "none", "num_train": 10, "eval_accuracy": 0.5, "hub_model_id": "org/v1"}
    card = add_victim_to_dataset_card(card, row)
    card = add_victim_to_dataset_card(card, {**row, "eval_accuracy": 0.25})
    card = add_victim_to_dataset_card(card, {**row, "hub_model_id": "org/v2", "eval_accuracy": 0.75})
    reloaded = DatasetCard(str(card))
    assert [r["eval_accuracy"] for r in reloaded.data.get("sep_hf_victims")] == [0.25, 0.75]
    assert "| 0.2500 | org/v1 |" in reloaded.text and "| 0.7500 | org/v2 |" in reloaded.text
    assert "0.5000" not in reloaded.text and "No victim" not in reloaded.text


def test_pretrained_fine_tuning_starts_from_hub_weights(loopback_hub, unique_repo_id, tmp_path):
    from huggingface_hub import HfApi

    source = build_victim_model(VictimTrainingConfig(model="smallnet_cifar"), [f"c{i}" for i in range(10)], (32, 32))
    source.save_pretrained(tmp_path)
    repo_id = unique_repo_id("pretrained-smallnet")
    HfApi().create_repo(repo_id)
    HfApi().upload_folder(repo_id=repo_id, folder_path=str(tmp_path))

    model = build_victim_model(VictimTrainingConfig(model=repo_id, pretrained=True), ["a", "b", "c"], (32, 32))
    assert model.config.num_labels == 3 and model.timm_model.get_classifier().out_features == 3
    torch.testing.assert_close(model.timm_model.stem[0].weight, source.timm_model.stem[0].weight)


def test_sample_grid_shows_clean_protected_and_the_amplified_perturbation():
    import io

    import numpy as np
    from PIL import Image

    from sep_hf.data.images import quantize
    from sep_hf.publish.cards import sample_grid_png

    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(8, 248, (3, 3, 4, 5), generator=generator).float() / 255
    delta = torch.randint(-4, 5, clean.shape, generator=generator).float() / 255
    protected = clean + delta
    scale, gap, (height, width) = 2, 2, clean.shape[2:]
    grid = np.asarray(Image.open(io.BytesIO(sample_grid_png(clean, protected, eps=4 / 255, scale=scale))))
    assert grid.shape == (3 * (height * scale + gap) - gap, 3 * (width * scale + gap) - gap, 3)
    rows = (clean, protected, 0.5 + delta / (2 * 4 / 255))  # the perturbation spans the full range at +-eps
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = r * (height * scale + gap), c * (width * scale + gap)
            tile = torch.from_numpy(grid[top : top + height * scale, left : left + width * scale].copy()).permute(2, 0, 1)
            expected = quantize(image.clamp(0, 1)).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            assert torch.equal(tile, expected), (r, c)
    assert (grid[height * scale : height * scale + gap] == 255).all()  # white separators between rows


@pytest.mark.slow
@pytest.mark.parametrize("processes, accumulation", [(2, 1), (1, 2)])
def test_victim_batch_is_global_across_processes_and_accumulation(tmp_path, processes, accumulation):
    """--batch_size is one optimizer step's batch: 2 processes (or 2 accumulated micro-batches) of 25 images,
    so 200 images make the 4 steps the learning-rate schedule was sized for (before: 2 steps of 100 on 2 processes,
    and --gradient_accumulation_steps ignored)."""
    from conftest import CIFAR10_DIR, run_recipe

    out = tmp_path / "victim"
    run_recipe("train_victim.py", ["--dataset", CIFAR10_DIR, "--preset", "cpu", "--max_train_samples", 200,
                                   "--max_eval_samples", 100, "--epochs", 1, "--batch_size", 50,
                                   "--gradient_accumulation_steps", accumulation, "--output_dir", out],
               num_processes=processes)
    results = json.loads((out / "results.json").read_text())
    assert results["optimizer_steps"] == results["planned_optimizer_steps"] == 4
    assert results["micro_batch_size"] == 25 and results["num_processes"] == processes


def test_victim_on_a_dataset_smaller_than_the_batch_trains_one_smaller_batch_per_epoch(tmp_path, caplog):
    from sep_hf.data.view import TrainingData
    from sep_hf.utils.presets import apply_preset
    from sep_hf.victim.trainer import train_victim

    images = torch.randint(0, 256, (18, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(18) % 3
    data = TrainingData(images[:12], labels[:12], images[12:], labels[12:], ("a", "b", "c"), "random", None)
    config = VictimTrainingConfig(model="smallnet_cifar", epochs=2, batch_size=16)
    apply_preset("cpu", config)
    with caplog.at_level("WARNING", logger="sep_hf"):
        results = train_victim(config, data, tmp_path)
    assert "--batch_size 16 is larger than the 12 training images: each epoch is one batch of 12" in caplog.text
    assert results["optimizer_steps"] == results["planned_optimizer_steps"] == 2 and results["micro_batch_size"] == 12


def test_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    from sep_hf.arguments import HubArguments, RunArguments
    from sep_hf.data.view import DataArguments
    from sep_hf.victim.job import VictimArguments, run_victim

    (tmp_path / "a-file").write_text("not a folder")
    run = RunArguments(output_dir=str(tmp_path / "a-file" / "victim"), preset="cpu")
    with pytest.raises(ValueError, match="Output folder .*a-file/victim cannot be written"):  # not the missing dataset
        run_victim(VictimTrainingConfig(), DataArguments(dataset=str(tmp_path / "none")), run, HubArguments(),
                   VictimArguments())


def test_a_full_disk_while_saving_the_victim_leaves_no_half_written_model(tmp_path, monkeypatch):
    """The model folder appears whole or not at all: a save that fails after writing part of it leaves no model/ and
    no staging folder behind."""
    import errno

    from transformers import Trainer

    from sep_hf.data.view import TrainingData
    from sep_hf.utils.presets import apply_preset
    from sep_hf.victim.trainer import train_victim

    def save_half(self, output_dir=None, _internal_call=False):
        (Path(output_dir) / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "save_model", save_half)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 2
    data = TrainingData(images[:12], labels[:12], images[12:], labels[12:], ("a", "b"), "random", None)
    config = VictimTrainingConfig(model="smallnet_cifar", epochs=1, batch_size=12)
    apply_preset("cpu", config)
    with pytest.raises(OSError):
        train_victim(config, data, tmp_path)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model*"))
