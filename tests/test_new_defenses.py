"""The appropriator's added trainings: bit depth, blur, strong augmentation, eval-mode AT, partial protection."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sep_hf.defenses import build_defense, get_defense
from sep_hf.squeezes import bit_depth, gaussian_blur
from sep_hf.victim import trainer as victims
from sep_hf.victim.job import VictimArguments, mix_clean_rows
from sep_hf.victim.trainer import VictimTrainingConfig, train_victim

TINY = dict(model="smallnet_cifar", epochs=1, batch_size=50, learning_rate=0.01, momentum=0.9, nesterov=False,
            weight_decay=0.0, label_smoothing=0.0, lr_schedule="linear", lr_milestones=[], warmup_epochs=0.0,
            crop_padding=0, flip=False)


@pytest.mark.parametrize("bits", [1, 2, 4, 7])
def test_bit_depth_keeps_at_most_2_to_the_bits_levels(cifar_small, bits):
    images = cifar_small.train_images[:64]
    squeezed = bit_depth(images, bits)
    assert squeezed.dtype == torch.uint8 and squeezed.shape == images.shape
    assert squeezed.unique().numel() <= 2**bits
    assert (squeezed.float() - images.float()).abs().max() <= 256 / 2**bits / 2 + 1  # within half a bin
    pixels = images.float().div(255).requires_grad_(True)
    out = bit_depth(pixels, bits)
    assert out.unique().numel() <= 2**bits
    (grad,) = torch.autograd.grad(out.sum(), pixels)  # straight-through: usable while crafting
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_blur_is_a_low_pass_that_keeps_the_mean(cifar_small):
    images = cifar_small.train_images[:32]
    blurred = gaussian_blur(images, 1.0)
    assert blurred.dtype == torch.uint8 and blurred.shape == images.shape
    assert (blurred.float().mean() - images.float().mean()).abs() < 1.0

    def high_frequency(x):  # energy of horizontal neighbour differences
        return (x.float()[..., 1:] - x.float()[..., :-1]).pow(2).mean()

    assert high_frequency(blurred) < 0.5 * high_frequency(images)
    pixels = images.float().div(255).requires_grad_(True)
    (grad,) = torch.autograd.grad(gaussian_blur(pixels, 1.0).sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def _spy_inputs(monkeypatch):
    seen = {True: [], False: []}
    build = victims.build_victim_model

    def spied(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda module, args, kwargs: seen[module.training].append(kwargs["pixel_values"].detach().clone()),
            with_kwargs=True)
        return model

    monkeypatch.setattr(victims, "build_victim_model", spied)
    return seen


@pytest.mark.parametrize("defense, flags", [("bitdepth", {"bitdepth_bits": 2}), ("blur", {"blur_sigma": 1.0}),
                                            ("augment", {})])
def test_new_defenses_touch_training_inputs_only(defense, flags, cifar_small, tmp_path, monkeypatch):
    data = dataclasses.replace(cifar_small, train_images=cifar_small.train_images[:100],
                               train_labels=cifar_small.train_labels[:100], eval_images=cifar_small.eval_images[:50],
                               eval_labels=cifar_small.eval_labels[:50])
    seen = _spy_inputs(monkeypatch)
    arguments = get_defense(defense).arguments(**flags)
    results = train_victim(VictimTrainingConfig(defense=defense, **TINY), data, tmp_path,
                           build_defense(defense, [arguments]))
    assert results["defense"] == defense and results["defense_settings"]
    mean = torch.tensor(results["normalization"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(results["normalization"]["std"]).view(1, 3, 1, 1)

    def as_uint8(batches):
        return (torch.cat(batches) * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)

    trained_on = as_uint8(seen[True])
    originals = data.train_images.flatten(1).float()
    distance = torch.cdist(trained_on.flatten(1).float(), originals, compute_mode="donot_use_mm_for_euclid_dist")
    assert (distance.min(1).values > 1.0).float().mean() > 0.9, "training inputs are not transformed"
    if defense == "bitdepth":
        assert trained_on.unique().numel() <= 4 + 2  # 2 bits; +2 for normalization round-trip rounding
    evaluated = as_uint8(seen[False])
    assert torch.equal(evaluated, data.eval_images), "the evaluation split must stay clean"


def test_augment_mixes_targets(cifar_small):
    defense = build_defense("augment", [get_defense("augment").arguments(augment_mix="mixup", augment_policy="none")])

    class Trainer:  # the slice of VictimTrainer the hook uses
        model = type("M", (), {"config": type("C", (), {"num_labels": 10})()})()
        to_pixels = to_normalized = staticmethod(lambda x: x)

    pixels = cifar_small.train_images[:16].float() / 255
    inputs, targets = defense.training_batch(Trainer(), pixels, cifar_small.train_labels[:16])
    assert inputs.shape == pixels.shape and targets.shape == (16, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    assert (targets.max(1).values < 1).any()  # soft: two classes mixed


def test_eval_mode_at_attacks_with_running_statistics(cifar_small, tmp_path):
    config = VictimTrainingConfig(defense="at", **TINY)
    model = victims.build_victim_model(config, cifar_small.class_names, (32, 32)).train()
    defense = build_defense("at", [get_defense("at").arguments(at_eps=8, at_attack_mode="eval")])
    assert defense.describe()["attack_mode"].startswith("eval") and defense.describe()["eps"] == 8
    modes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: modes.append(module.training), with_kwargs=True)

    class Trainer:
        pass

    trainer = Trainer()
    trainer.model = model
    trainer.to_pixels = trainer.to_normalized = lambda x: x
    pixels = cifar_small.train_images[:8].float() / 255
    adversarial = defense.training_inputs(trainer, pixels, cifar_small.train_labels[:8])
    assert modes and not any(modes), "the attack must run in eval mode"
    assert model.training, "the model is back in train mode for the update"
    assert (adversarial - pixels).abs().max() * 255 <= 8 + 1e-3
    with pytest.raises(ValueError, match="--at_attack_mode"):
        get_defense("at").arguments(at_attack_mode="test")


def test_partial_protection_swaps_the_chosen_rows_for_their_originals(cifar_small):
    protected = dataclasses.replace(cifar_small, train_images=255 - cifar_small.train_images)
    mixed = mix_clean_rows(protected, cifar_small, 0.2, seed=0)
    clean_rows = (mixed.train_images == cifar_small.train_images).flatten(1).all(1)
    assert clean_rows.sum() == round(0.2 * len(cifar_small.train_labels))
    assert torch.equal(mixed.train_images[~clean_rows], protected.train_images[~clean_rows])
    assert torch.equal(mixed.train_labels, protected.train_labels)
    assert torch.equal(mix_clean_rows(protected, cifar_small, 0.2, seed=0).train_images, mixed.train_images)
    with pytest.raises(ValueError, match="--clean_fraction needs --clean_dataset"):
        VictimArguments(clean_fraction=0.5)
    shuffled = dataclasses.replace(cifar_small, train_labels=cifar_small.train_labels.roll(1))
    with pytest.raises(ValueError, match="labels differ"):
        mix_clean_rows(protected, shuffled, 0.5)


@pytest.mark.parametrize("quality", [10, 50])
def test_differentiable_jpeg_matches_pil_and_has_gradients(cifar_small, quality):
    from sep_hf.squeezes import jpeg

    images = cifar_small.eval_images[:100]
    reference = jpeg(images, quality).float() / 255  # PIL's libjpeg
    pixels = (images.float() / 255).requires_grad_(True)
    approximation = jpeg(pixels, quality)
    psnr = 10 * torch.log10(1 / (approximation.detach() - reference).pow(2).mean())
    distortion = 10 * torch.log10(1 / (reference - images.float() / 255).pow(2).mean())
    # stated tolerance: within 30 dB of PIL, far closer than JPEG itself is to the original
    assert psnr > 30 and psnr > distortion + 4, (float(psnr), float(distortion))
    (grad,) = torch.autograd.grad(approximation.sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_notch_removes_most_of_a_class_wise_grating(cifar_small):
    """--defense notch zeroes the grating family's frequencies: of a 10-level grating added to real images,
    less than a fifth of the energy is left; the other frequencies are untouched."""
    from sep_hf.gratings import class_gratings
    from sep_hf.squeezes import jpeg

    images, labels = cifar_small.train_images[:200], cifar_small.train_labels[:200]
    defense = build_defense("notch", [])
    grating = 10 * class_gratings(labels, torch.arange(len(labels)), (32, 32), 10, seed=0)
    protected = (images.float() + grating).round().clamp(0, 255).to(torch.uint8)
    left = defense.prepare_training_images(protected).float() - defense.prepare_training_images(images).float()
    assert left.pow(2).mean() < 0.2 * grating.pow(2).mean(), "the grating's energy is mostly gone"
    bins = defense.mask((32, 32))
    spectrum = torch.fft.fft2(images.float())
    outside = (torch.fft.fft2(defense.prepare_training_images(images).float()) - spectrum)[..., ~bins]
    assert outside.abs().mean() < 0.05 * spectrum[..., ~bins].abs().mean(), "the rest changes only by rounding and clipping"
    assert 0 < bins.sum() < 32 * 32 // 8
    after_jpeg = build_defense("notch", [dataclasses.replace(defense.settings, notch_jpeg_quality=10)])
    assert torch.equal(after_jpeg.prepare_training_images(protected),
                       defense.prepare_training_images(jpeg(protected, 10))), "JPEG first, then the notch"
    with pytest.raises(ValueError, match="notch_radius"):
        build_defense("notch", [dataclasses.replace(defense.settings, notch_radius=9)])


def test_median_removes_isolated_pixels_and_keeps_flat_regions(cifar_small):
    """--defense median: one pixel set to a far colour in every image is gone after the 3x3 median (it
    moves at most its neighbours' rank by one); a constant image and the dtype are unchanged."""
    from sep_hf.defenses.median import median_filter

    defense = build_defense("median", [])
    images = cifar_small.train_images[:64]
    spiked = images.clone()
    spiked[:, :, 10, 20] = torch.tensor([255, 0, 255], dtype=torch.uint8).view(1, 3)
    filtered, reference = defense.prepare_training_images(spiked), defense.prepare_training_images(images)
    assert filtered.dtype == torch.uint8 and filtered.shape == images.shape
    spike = (spiked.float() - images.float())[:, :, 10, 20].abs().mean()
    assert (filtered.float() - reference.float())[:, :, 10, 20].abs().mean() < 0.1 * spike, "the spike is gone"
    flat = torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(median_filter(flat, 5), flat)
    assert not torch.equal(reference, images), "the filter changes natural images"
    with pytest.raises(ValueError, match="median_size"):
        build_defense("median", [dataclasses.replace(defense.settings, median_size=4)])
