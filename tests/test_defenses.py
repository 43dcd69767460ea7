"""Victim defenses (sep_hf/defenses/) inside the Trainer loop: PGD-AT, RSE, JPEG, grayscale."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import CIFAR10_DIR, run_recipe
from huggingface_hub import DatasetCard
from transformers import TrainingArguments
from transformers.modeling_outputs import ImageClassifierOutput

from sep_hf.defenses import DEFENSES, build_defense, get_defense, list_defenses, register_defense
from sep_hf.defenses.at import ATArguments, frozen_buffers
from sep_hf.defenses.base import Defense
from sep_hf.defenses.jpeg import JPEGArguments
from sep_hf.defenses.rse import RSEArguments
from sep_hf.publish.cards import add_victim_to_dataset_card, defense_label, protected_dataset_card
from sep_hf.source.augment import channel_stats
from sep_hf.squeezes import grayscale, jpeg
from sep_hf.victim import trainer as victims
from sep_hf.victim.trainer import (
    TensorImageDataset,
    VictimCollator,
    VictimTrainer,
    VictimTrainingConfig,
    build_victim_model,
    train_victim,
)


def _trainer(tmp_path, model, config, mean, std, defense_args=(), **kwargs) -> VictimTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to="none",
                             per_device_eval_batch_size=500, disable_tqdm=True, remove_unused_columns=False)
    return VictimTrainer(model=model, args=args, recipe=config, mean=mean, std=std,
                         defense=build_defense(config.defense, defense_args), **kwargs)


def _batch(images, labels, mean, std) -> dict:
    return VictimCollator(mean, std)([{"image": image, "label": label} for image, label in zip(images, labels)])


# ----------------------------------------------------------------------------------------------
# the flag


def test_defense_flag_is_validated_against_the_registry(monkeypatch):
    DEFENSES.load()
    monkeypatch.setattr(DEFENSES, "_classes", dict(DEFENSES._classes))  # the test's registration is undone
    names = list_defenses()
    assert {"none", "at", "rse", "jpeg", "grayscale"} <= set(names) and names == sorted(names)
    with pytest.raises(ValueError, match=f"Unknown defense 'mixup'; choose one of {', '.join(names)} \\(--defense\\)"):
        VictimTrainingConfig(defense="mixup")
    with pytest.raises(ValueError, match="--at_eps only applies to --defense at"):
        build_defense("rse", [RSEArguments(), ATArguments(at_eps=8)])  # would silently train without AT
    with pytest.raises(ValueError, match="--jpeg_quality must be in 1..95"):
        JPEGArguments(jpeg_quality=0)
    # the parsed dataclasses of every defense are passed along: only a changed flag of another defense fails
    assert isinstance(build_defense("rse", [RSEArguments(rse_draws=3), ATArguments(), JPEGArguments()]),
                      get_defense("rse"))
    assert build_defense("at", [ATArguments(at_eps=8)]).describe()["step_size"] == 2.0  # eps / 4
    assert build_defense("at").describe()["eps"] == 4.0  # absent flags: the defaults

    @register_defense("cutout-test")  # a later augmentation-based defense is one decorated class
    class Cutout(Defense):
        pass

    assert "cutout-test" in list_defenses() and isinstance(build_defense("cutout-test"), Cutout)
    assert VictimTrainingConfig(defense="cutout-test").defense == "cutout-test"


def test_the_throwaway_defense_was_unregistered():
    """Runs after the test above (file order): its monkeypatch must have undone the registration."""
    assert "cutout-test" not in list_defenses()
    with pytest.raises(ValueError, match="Unknown defense 'cutout-test'"):
        VictimTrainingConfig(defense="cutout-test")


def test_card_rows_show_the_defense_and_its_settings():
    results = {"eps": 8, "method": "sep", "mean_psnr": 35.0, "dataset": "uoft-cs/cifar10", "dataset_revision": None,
               "splits": {"train": {"num_examples": 10, "max_linf": 8, "mean_psnr": 35.0, "mean_l2": 1.2}},
               "config": {}}
    data, body = protected_dataset_card(results, ["- method: `sep`, L-inf budget eps = 8/255"], "grid.png")
    settings = build_defense("at").describe()
    row = {"model": "smallnet_cifar", "defense": "at", "defense_settings": settings, "num_train": 10,
           "eval_accuracy": 0.5, "hub_model_id": None}
    card = add_victim_to_dataset_card(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"), row)
    card = add_victim_to_dataset_card(card, {**row, "defense_settings": {**settings, "eps": 8.0}, "eval_accuracy": 0.4})
    # a row per setting: an eps-8 victim does not replace the eps-4 one
    assert "| at (eps 4, steps 10, step_size 1, random_start True) | 10 | 0.5000 |" in card.text
    assert "| at (eps 8, steps 10, step_size 1, random_start True) | 10 | 0.4000 |" in card.text
    assert defense_label("none", {}) == "none"


# ----------------------------------------------------------------------------------------------
# PGD adversarial training


@pytest.fixture(scope="module")
def at_setup(cifar_small):
    config = VictimTrainingConfig(model="smallnet_cifar", defense="at", crop_padding=0, flip=False, label_smoothing=0.0)
    torch.manual_seed(0)
    model = build_victim_model(config, cifar_small.class_names, (32, 32)).train()
    mean, std = channel_stats(cifar_small.train_images)
    return config, model, mean, std, _batch(cifar_small.train_images[:64], cifar_small.train_labels[:64], mean, std)


def test_pgd_attack_raises_the_loss_within_eps_in_pixel_space(at_setup, tmp_path):
    config, model, mean, std, batch = at_setup
    trainer = _trainer(tmp_path, model, config, mean, std)
    buffers = copy.deepcopy(list(model.buffers()))
    adversarial = trainer.defense.training_inputs(trainer, batch["pixel_values"], batch["labels"])

    clean_pixels, adv_pixels = trainer.to_pixels(batch["pixel_values"]), trainer.to_pixels(adversarial)
    assert (adv_pixels - clean_pixels).abs().max() * 255 <= 4 + 1e-3  # default eps 4/255, in pixels
    assert (adv_pixels - clean_pixels).abs().max() * 255 > 3.9  # it uses the budget
    assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6
    with torch.no_grad(), frozen_buffers(model):  # the train-mode loss the attack maximizes
        clean_loss = F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
        adv_loss = F.cross_entropy(model(pixel_values=adversarial).logits, batch["labels"])
    assert adv_loss > clean_loss + 1.0, (clean_loss, adv_loss)
    # The attack leaves no trace: train mode kept, running statistics untouched, no parameter grads.
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in model.parameters())


def test_adversarial_training_attacks_inside_the_victim_loop(at_setup, tmp_path):
    config, model, mean, std, batch = at_setup
    standard = _trainer(tmp_path, copy.deepcopy(model), dataclasses.replace(config, defense="none"), mean, std)
    adversarial = _trainer(tmp_path, copy.deepcopy(model), config, mean, std)
    assert (standard.defense.name, adversarial.defense.name) == ("none", "at")
    # evaluation is never attacked
    with torch.no_grad():
        torch.testing.assert_close(standard.compute_loss(standard.model.eval(), batch),
                                   adversarial.compute_loss(adversarial.model.eval(), batch))
    standard_loss = standard.compute_loss(standard.model.train(), batch)
    adversarial_loss = adversarial.compute_loss(adversarial.model.train(), batch)
    assert adversarial_loss > standard_loss + 1.0, (standard_loss, adversarial_loss)


# ----------------------------------------------------------------------------------------------
# Random Self-Ensemble


def test_rse_wrapper_keeps_the_timm_parameters_and_noise_stays_on_at_inference(cifar_small, tmp_path):
    from transformers import AutoModelForImageClassification

    config = VictimTrainingConfig(model="smallnet_cifar", defense="rse")
    torch.manual_seed(0)
    model = build_victim_model(config, cifar_small.class_names, (32, 32))
    mean, std = channel_stats(cifar_small.train_images)
    model.config.pretrained_cfg = victims._processor_config(mean, std, (32, 32))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    defense = build_defense(config.defense)
    assert defense.wrap_model(model) is model
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)
    assert defense.describe()["noise_layers"] == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 7

    x = _batch(cifar_small.eval_images[:8], cifar_small.eval_labels[:8], mean, std)["pixel_values"]
    model.eval()
    with torch.no_grad():
        first, second = model(pixel_values=x).logits, model(pixel_values=x).logits
        assert not torch.allclose(first, second)  # noise is active at inference
        defense.noise.remove()
        torch.testing.assert_close(model(pixel_values=x).logits, model(pixel_values=x).logits)  # the only randomness

    model.save_pretrained(tmp_path / "model")  # what the Hub gets loads as the plain timm model
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model").state_dict()
    assert list(reloaded) == list(before) and all(torch.equal(reloaded[name], before[name]) for name in before)


class _TinyConvNet(nn.Module):
    """Two convolutions and a linear head, with the TimmWrapper call signature."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, pixel_values, labels=None):
        features = F.relu(self.conv2(F.relu(self.conv1(pixel_values))))
        return ImageClassifierOutput(logits=self.fc(features.mean((2, 3))))


def test_rse_ensemble_beats_one_draw_in_trainer_evaluation(tmp_path):
    # Four classes of noisy 8x8 templates; noise strong enough that single draws often err.
    generator = torch.Generator().manual_seed(0)
    templates = torch.randint(40, 216, (4, 3, 8, 8), generator=generator).float()

    def sample(n):
        labels = torch.randint(0, 4, (n,), generator=generator)
        images = (templates[labels] + 60 * torch.randn(n, 3, 8, 8, generator=generator)).round().clamp(0, 255)
        return images.to(torch.uint8), labels

    (train_images, train_labels), (eval_images, eval_labels) = sample(512), sample(1000)
    mean, std = [0.5] * 3, [0.25] * 3
    config = VictimTrainingConfig(defense="rse", crop_padding=0, flip=False, label_smoothing=0.0)
    torch.manual_seed(0)
    model = _TinyConvNet(4)
    trainer = _trainer(tmp_path, model, config, mean, std, data_collator=VictimCollator(mean, std),
                       defense_args=[RSEArguments(rse_init_std=1.0, rse_inner_std=0.5, rse_draws=10)],
                       eval_dataset=TensorImageDataset(eval_images, eval_labels),
                       compute_metrics=lambda p: {"accuracy": (p.predictions.argmax(-1) == p.label_ids).mean()})
    trainer.defense.wrap_model(model)  # no pretrained_cfg: noise in input units
    train = _batch(train_images, train_labels, mean, std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _step in range(150):  # a tiny model trained with its noise, as RSE trains
        index = torch.randint(0, 512, (64,), generator=generator)
        loss = F.cross_entropy(model(pixel_values=train["pixel_values"][index]).logits, train["labels"][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    ensemble = trainer.evaluate()["eval_accuracy"]  # through compute_loss -> defense.eval_logits
    pixels = _batch(eval_images, eval_labels, mean, std)["pixel_values"]
    model.eval()
    with torch.no_grad():
        single = [(model(pixel_values=pixels).logits.argmax(1) == eval_labels).float().mean().item() for _ in range(10)]
    assert ensemble > max(single) + 0.03, (ensemble, single)


# ----------------------------------------------------------------------------------------------
# JPEG and grayscale: training images only


def test_jpeg_and_grayscale_transforms(cifar_small):
    images = cifar_small.train_images[:100]
    gray = grayscale(images)
    assert gray.dtype == torch.uint8 and gray.shape == images.shape
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])
    assert not torch.equal(images[:, 0], images[:, 1])

    compressed = jpeg(images, quality=10)
    assert compressed.dtype == torch.uint8 and compressed.shape == images.shape
    assert torch.equal(compressed, jpeg(images, quality=10))
    # the quality flag is honoured: quality 10 is lossy, quality 95 nearly lossless
    error = {q: (jpeg(images, q).float() - images.float()).abs().mean().item() for q in (10, 95)}
    assert error[10] > 5 > 2 > error[95], error


@pytest.mark.parametrize("defense", ["jpeg", "grayscale"])
def test_image_defenses_reach_training_inputs_only(defense, cifar_small, tmp_path, monkeypatch):
    """Spy on the model's inputs in a real (tiny) train_victim run, in training and in evaluation."""
    data = dataclasses.replace(cifar_small, train_images=cifar_small.train_images[:100],
                               train_labels=cifar_small.train_labels[:100], eval_images=cifar_small.eval_images[:50],
                               eval_labels=cifar_small.eval_labels[:50])
    seen = {True: [], False: []}
    build = victims.build_victim_model

    def spied(*args, **kwargs):
        model = build(*args, **kwargs)

        def record(module, args, kwargs):
            seen[module.training].append(kwargs["pixel_values"].detach().clone())

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(victims, "build_victim_model", spied)
    config = VictimTrainingConfig(model="smallnet_cifar", defense=defense, epochs=1, batch_size=50, learning_rate=0.01,
                                  momentum=0.9, nesterov=False, weight_decay=0.0, label_smoothing=0.0,
                                  lr_schedule="linear", lr_milestones=[], warmup_epochs=0.0, crop_padding=0, flip=False)
    results = train_victim(config, data, tmp_path, build_defense(defense))
    assert results["defense"] == defense and results["defense_settings"]

    mean, std = results["normalization"]["mean"], results["normalization"]["std"]
    assert (mean, std) == tuple(map(list, channel_stats(data.train_images)))  # of the data as published

    def to_uint8(batches):
        pixels = torch.cat(batches) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        return (pixels * 255).round().to(torch.uint8).flatten(1)

    transformed = jpeg(data.train_images, 10) if defense == "jpeg" else grayscale(data.train_images)
    trained_on = to_uint8(seen[True])  # no augmentation: exactly the (shuffled) prepared images
    assert len(trained_on) == 100
    def nearest(a, b):  # exact distances (the matmul shortcut loses ~4 levels at these magnitudes)
        return torch.cdist(a.float(), b.flatten(1).float(), compute_mode="donot_use_mm_for_euclid_dist").min(1).values

    distance_to_transformed, distance_to_original = nearest(trained_on, transformed), nearest(trained_on, data.train_images)
    assert distance_to_transformed.max() < 1e-3
    assert (distance_to_original > 1.0).float().mean() > 0.9  # (CIFAR-10 has a few gray images already)

    evaluated = torch.cat(seen[False])
    expected = _batch(data.eval_images, data.eval_labels, mean, std)["pixel_values"]
    torch.testing.assert_close(evaluated, expected, rtol=0, atol=1e-6)  # the clean split, untouched


# ----------------------------------------------------------------------------------------------
# the recipe


def test_train_victim_recipe_with_rse_writes_defense_settings(tmp_path):
    from transformers import AutoModelForImageClassification

    import sep_hf.models  # noqa: F401

    output_dir = tmp_path / "victim-rse"
    result = run_recipe("train_victim.py", [
        "--dataset", CIFAR10_DIR, "--preset", "cpu", "--max_train_samples", 500, "--max_eval_samples", 200,
        "--epochs", 2, "--batch_size", 25, "--warmup_epochs", 0, "--defense", "rse", "--rse_draws", 3,
        "--output_dir", output_dir])
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_train"] == 500 and results["num_eval"] == 200
    # clean CIFAR-10 is learnable even through RSE's noise: 0.245 on this machine, chance is 0.10
    assert results["eval_accuracy"] == results["history"][-1]["eval_accuracy"] >= 0.17, results["history"]
    assert results["defense"] == "rse"
    assert {"init_std": 0.2, "inner_std": 0.1, "draws": 3, "noise_layers": 7}.items() <= results["defense_settings"].items()
    assert "defense rse (init_std 0.2, inner_std 0.1, draws 3, noise_layers 7)" in result.stdout
    card = (output_dir / "model" / "README.md").read_text()
    assert "## Defense: `rse`" in card and "noiseless network" in card
    model = AutoModelForImageClassification.from_pretrained(output_dir / "model")
    fresh = build_victim_model(VictimTrainingConfig(model="smallnet_cifar"), [str(i) for i in range(10)], (32, 32))
    assert list(model.state_dict()) == list(fresh.state_dict())
