"""SEP crafting: budget, effect on the ensemble, FA means, VR's own means, determinism, map adapter."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from sep_hf import SEPConfig, SEPTransform, craft_sep
from sep_hf.budget import Budget
from sep_hf.data.images import quantize, tensor_to_png_images
from sep_hf.protect import get_protection, list_protections
from sep_hf.protect.methods.sep import target_classes, vr_picks

pytestmark = pytest.mark.usefixtures("tiny_ensemble")


@pytest.fixture(scope="module")
def batch(cifar_small):
    images = cifar_small.train_images[:24].float() / 255
    return images, cifar_small.train_labels[:24]


@pytest.fixture(scope="module")
def means(tiny_ensemble, cifar_small, tmp_path_factory):
    return tiny_ensemble.class_means(cifar_small.train_images, cifar_small.train_labels,
                                     cache_dir=tmp_path_factory.mktemp("means"))


def test_the_tiny_ensemble_learned_something(tiny_ensemble):
    """The crafting tests below need checkpoints that classify: a 10-epoch run on 1000 images."""
    accuracies = [record["clean_test_accuracy"] for record in tiny_ensemble.records]
    assert tiny_ensemble.epochs == [2, 5, 8, 10] and accuracies[-1] > accuracies[0]
    assert accuracies[-1] >= 0.3, accuracies  # chance: 0.10


def test_registry_holds_the_three_variants():
    assert {"sep", "sep-fa", "sep-fa-vr"} <= set(list_protections())
    assert get_protection("sep-fa-vr") is get_protection("sep") is SEPTransform


@pytest.mark.parametrize("method", ["sep", "sep-fa", "sep-fa-vr"])
@pytest.mark.parametrize("eps_levels", [2, 4, 8])
def test_budget_holds_for_every_pixel_after_quantization(tiny_ensemble, batch, means, method, eps_levels):
    images, labels = batch
    config = SEPConfig(method=method, eps=eps_levels / 255, steps=4, step_size=max(1, eps_levels // 2) / 255)
    protected = craft_sep(images, labels, tiny_ensemble, config, class_means=means)
    assert torch.equal(quantize(protected).float() / 255, protected), "not on the 1/255 grid"
    delta = (quantize(protected).int() - quantize(images).int()).abs()
    assert delta.max().item() <= eps_levels
    assert protected.min() >= 0 and protected.max() <= 1
    assert (protected - images).abs().mean() > (eps_levels / 255) / 4  # non-trivial


def test_budget_clamp_handles_off_grid_eps_and_originals():
    original = torch.tensor([0.5 / 255, 10.5 / 255, 200 / 255]).view(1, 3, 1, 1)
    pushed = original + 2.9 / 255
    clamped = Budget.from_pixels(2.5 / 255).clamp(pushed, original)
    assert ((clamped * 255).round() - (original * 255).round()).abs().max() <= 2


@pytest.mark.parametrize("method", ["sep", "sep-fa", "sep-fa-vr"])
def test_sep_pushes_the_ensemble_towards_the_target_class(tiny_ensemble, cifar_small, means, method):
    # The tiny ensemble (45% accuracy) is far smoother than a real one, so it takes a larger
    # budget to move it; at CPU scale 8/255 moves 6 checkpoints from 1% to 80% (bench/).
    images, labels = cifar_small.train_images[:64].float() / 255, cifar_small.train_labels[:64]
    target = target_classes(labels, tiny_ensemble.num_classes)
    clean = (tiny_ensemble.predict(images) == target).float().mean().item()
    config = SEPConfig(method=method, eps=16 / 255, steps=20, step_size=2 / 255)
    protected = craft_sep(images, labels, tiny_ensemble, config, class_means=means)
    after = (tiny_ensemble.predict(protected) == target).float().mean().item()
    assert after > clean + 0.2, f"{method}: fraction of (image, checkpoint) pairs on g(y) {clean:.2f} -> {after:.2f}"


def test_target_class_is_half_the_classes_away():
    assert target_classes(torch.tensor([0, 4, 5, 9]), 10).tolist() == [5, 9, 0, 4]
    assert target_classes(torch.tensor([0, 49, 50, 99]), 100).tolist() == [50, 99, 0, 49]


def test_class_means_match_a_direct_per_class_mean(tiny_ensemble, cifar_small, means):
    images = cifar_small.train_images.float() / 255
    for k in (0, tiny_ensemble.num_models - 1):
        model = tiny_ensemble.models[k]
        with torch.no_grad(), tiny_ensemble.autocast():
            features = torch.cat([model.features(images[i : i + 250]).float() for i in range(0, len(images), 250)])
        for c in range(tiny_ensemble.num_classes):
            direct = features[cifar_small.train_labels == c].mean(0)
            torch.testing.assert_close(means[k, c], direct, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(means[0], means[-1]), "checkpoints should have different class means"


def _reference_vr(images, labels, ensemble, config, means, own_means: bool):
    """Straightforward SEP-FA-VR, one example at a time; own_means=False is the official code's bug."""
    K, M = ensemble.num_models, config.vr_steps or ensemble.num_models
    target = target_classes(labels, ensemble.num_classes)
    out = []
    for n in range(len(images)):
        x0 = images[n : n + 1]
        x = x0.clone()

        def grad(k, point, mean_k, n=n):
            point = point.clone().requires_grad_(True)
            loss = (ensemble.models[k].features(point) - means[mean_k][target[n : n + 1]]).pow(2).mean(1).sum()
            return torch.autograd.grad(loss, point)[0]

        for step in range(config.steps):
            g = [grad(k, x, k) for k in range(K)]
            mean_grad = sum(g) / K
            picks = vr_picks(torch.tensor([n]), config.seed, step, M, K)[0]
            inner, accumulated = x.clone(), torch.zeros_like(x)
            for m in range(M):
                j = int(picks[m])
                accumulated += grad(j, inner, j if own_means else K - 1) - (g[j] - mean_grad)
                inner = torch.min(torch.max(inner - config.step_size * accumulated.sign(), x0 - config.eps), x0 + config.eps).clamp(0, 1)
            x = torch.min(torch.max(x - config.step_size * accumulated.sign(), x0 - config.eps), x0 + config.eps).clamp(0, 1)
        out.append(Budget.from_pixels(config.eps).clamp(x, x0))
    return torch.cat(out)


def test_vr_uses_the_picked_checkpoints_own_class_means(tiny_ensemble, batch, means):
    images, labels = batch[0][:6], batch[1][:6]
    config = SEPConfig(method="sep-fa-vr", steps=2, vr_steps=4, bf16=False)
    ours = craft_sep(images, labels, tiny_ensemble, config, class_means=means)
    correct = _reference_vr(images, labels, tiny_ensemble, config, means, own_means=True)
    buggy = _reference_vr(images, labels, tiny_ensemble, config, means, own_means=False)
    assert not torch.equal(correct, buggy), "the test cannot tell the two apart"
    mismatch = (ours != correct).float().mean().item()
    assert mismatch < 0.01, f"{mismatch:.2%} of pixels differ from the reference"
    assert (ours != buggy).float().mean().item() > 10 * max(mismatch, 1e-3)


def test_vr_picks_depend_only_on_seed_index_and_step():
    picks = vr_picks(torch.arange(100, 110), seed=3, outer_step=2, inner_steps=5, num_models=6)
    again = vr_picks(torch.tensor([105, 100]), seed=3, outer_step=2, inner_steps=5, num_models=6)
    assert torch.equal(again, picks[[5, 0]])
    assert picks.min() >= 0 and picks.max() < 6 and len(picks.unique()) > 1
    assert not torch.equal(picks, vr_picks(torch.arange(100, 110), 4, 2, 5, 6))


def test_two_runs_are_identical(tiny_ensemble, batch, means):
    config = SEPConfig(method="sep-fa-vr", steps=3)
    first = craft_sep(*batch, tiny_ensemble, config, class_means=means)
    second = craft_sep(*batch, tiny_ensemble, config, class_means=means)
    assert torch.equal(first, second)


def test_bad_inputs_are_clear_errors(tiny_ensemble, batch):
    with pytest.raises(ValueError, match="method must be one of"):
        SEPConfig(method="sep-xx")
    with pytest.raises(ValueError, match="eps is in"):
        SEPConfig(eps=8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        craft_sep(batch[0][:2], torch.tensor([3, 12]), tiny_ensemble, SEPConfig(method="sep", steps=1))
    with pytest.raises(ValueError, match="needs class_means"):
        SEPTransform(tiny_ensemble, SEPConfig(method="sep-fa"))


def test_transform_maps_a_dataset_with_png_output_and_stats(tiny_ensemble, batch, means):
    images, labels = batch
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    source = datasets.Dataset.from_dict({"img": tensor_to_png_images(images), "label": labels.tolist()},
                                        features=features)
    config = SEPConfig(method="sep-fa", steps=3)
    transform = SEPTransform(tiny_ensemble, config, class_means=means, return_stats=True)
    protected = source.map(transform, batched=True, batch_size=10, with_indices=True,
                           features=transform.output_features(source.features))
    assert protected.features["img"] == source.features["img"]
    assert protected.features["label"] == source.features["label"]
    assert max(protected["linf"]) <= 8 and min(protected["psnr"]) > 30
    expected = craft_sep(images, labels, tiny_ensemble, config, class_means=means)
    pixels = torch.stack([torch.from_numpy(np.array(row["img"])).permute(2, 0, 1) for row in protected]) / 255
    assert torch.equal(pixels, expected)
    assert set(protected["checkpoints_predicting_label"]) <= set(range(tiny_ensemble.num_models + 1))


def test_map_over_a_hub_dataset_push_and_reload(loopback_hub, unique_repo_id, tiny_ensemble, batch, means):
    images, labels = batch
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    source_id, protected_id = unique_repo_id("clean-small"), unique_repo_id("clean-small-sep")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"img": tensor_to_png_images(images), "label": labels.tolist()}, features=features)}).push_to_hub(source_id)

    source = datasets.load_dataset(source_id)
    config = SEPConfig(method="sep-fa-vr", steps=2)
    protected = source.map(SEPTransform(tiny_ensemble, config, class_means=means), batched=True, batch_size=8,
                           with_indices=True)
    protected.push_to_hub(protected_id)
    reloaded = datasets.load_dataset(protected_id, split="train")
    assert reloaded.features == source["train"].features
    pixels = torch.stack([torch.from_numpy(np.array(row["img"])).permute(2, 0, 1) for row in reloaded]) / 255
    assert torch.equal(pixels, craft_sep(images, labels, tiny_ensemble, config, class_means=means))
