"""EM / REM: budget, min-min effect, REM's robustness, exact resume, the map adapter and protect.py."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sep_hf.arguments import RunArguments
from sep_hf.data.images import tensor_to_png_images
from sep_hf.data.view import DataArguments
from sep_hf.protect import get_protection
from sep_hf.protect.base import load_shards, protect_split
from sep_hf.protect.job import ProtectArguments, run_protection
from sep_hf.protect.methods import em as em_module
from sep_hf.protect.methods.em import EMArguments, EMConfig, EMTransform, fit_error_minimizing_noise, robust_loss
from sep_hf.seeding import seeded_generator
from sep_hf.source.recipe import SourceTrainingConfig

# A tiny problem: 16x16 images (4x cheaper than CIFAR's 32x32), the small net, a few iterations.
TINY = dict(batch_size=64, chunk_size=256, crop_padding=2, lr_decay_every=1000)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches this small gain nothing from a second thread, and on shared (busy) cores its barriers
    made the fits 40x slower; one thread keeps this module at seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(cifar_small):
    images = F.avg_pool2d(cifar_small.train_images[:256].float(), 2).round().to(torch.uint8)
    return images, cifar_small.train_labels[:256]


@pytest.fixture(scope="module")
def em_fit(tiny):
    return fit_error_minimizing_noise(*tiny, EMConfig(method="em", iterations=40, steps=5, train_steps=10, **TINY), 10)


@pytest.fixture(scope="module")
def rem_fit(tiny):
    # A gentler lr than EM's: a few adversarial iterations at 0.1 leave BN's running statistics (used
    # in eval mode by the attacks) far off, and the losses compared below meaningless.
    config = EMConfig(method="rem", iterations=30, steps=4, eot=2, attack_steps=2, learning_rate=0.02,
                      **{**TINY, "batch_size": 32})
    return fit_error_minimizing_noise(*tiny, config, 10)


def test_config_defaults_follow_the_papers():
    em, rem = EMConfig(method="em"), EMConfig(method="rem")
    assert (em.steps, round(em.step_size * 255, 6)) == (20, 0.8)  # EM: 20 steps of 0.8/255
    assert (rem.steps, rem.step_size, rem.attack_steps, rem.eot) == (10, rem.eps / 5, 10, 5)  # REM: rho_u / 5
    assert rem.attack_step_size == pytest.approx(0.8 / 255)
    assert get_protection("rem") is get_protection("em") is EMTransform and not EMTransform.protects_all_splits
    with pytest.raises(ValueError, match="method must be one of em, rem"):
        EMConfig(method="tap")
    with pytest.raises(ValueError, match="fix --rem_eot"):
        EMConfig(method="rem", eot=0)
    with pytest.raises(ValueError, match="fix --eps"):
        EMConfig(eps=8)
    config = EMArguments(em_steps=7, em_step_size=2, rem_attack_eps=2, rem_eot=3).config("rem", 16 / 255, seed=4)
    assert (config.steps, config.step_size, config.attack_eps, config.eot, config.seed) == (7, 2 / 255, 2 / 255, 3, 4)


@pytest.mark.slow  # fits REM (an inner PGD per step): 15 s on 2 cores
@pytest.mark.parametrize("name", ["em_fit", "rem_fit"])
def test_budget_holds_for_every_pixel(request, tiny, name):
    fit = request.getfixturevalue(name)
    protected = tiny[0].short() + fit.delta
    assert fit.delta.dtype == torch.int8 and fit.delta.shape == tiny[0].shape
    assert fit.delta.abs().max() <= 8 and protected.min() >= 0 and protected.max() <= 255
    assert fit.delta.abs().float().mean() > 2, "the noise is (nearly) empty"


def _loss(model, images, labels):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(images), labels).item()


def test_em_noise_lowers_the_source_models_loss(tiny, em_fit):
    images, labels = tiny
    clean = images.float() / 255
    protected = (images.short() + em_fit.delta).float() / 255
    assert em_fit.iterations == 40 and len(em_fit.history) == 4 and em_fit.done
    clean_loss, protected_loss = _loss(em_fit.model, clean, labels), _loss(em_fit.model, protected, labels)
    assert protected_loss < 0.7 * clean_loss, f"loss on x + delta {protected_loss:.3f} vs on x {clean_loss:.3f}"


@pytest.mark.slow  # fits REM (an inner PGD per step): 15 s on 2 cores
def test_rem_noise_has_a_lower_loss_under_the_inner_attack_than_em_noise(tiny, em_fit, rem_fit):
    images, labels = tiny
    attack = EMConfig(method="rem", eot=4, attack_steps=5, crop_padding=2)  # the inner attack rho_a = 4/255
    losses = {}
    for name, fit in (("em", em_fit), ("rem", rem_fit)):
        protected = (images.short() + fit.delta).float() / 255
        losses[name] = robust_loss(rem_fit.model, protected, labels, attack, seeded_generator(123))[0] / len(labels)
    assert losses["rem"] < 0.9 * losses["em"], losses


@pytest.mark.parametrize("method", ["em", "rem"])
def test_a_paused_fit_resumes_to_the_same_noise(tiny, tmp_path, method):
    images, labels = tiny[0][:64], tiny[1][:64]
    config = EMConfig(method=method, iterations=6, batch_size=16, train_steps=2, steps=2, eot=1, attack_steps=1,
                      chunk_size=32, crop_padding=2, lr_decay_every=4)
    uninterrupted = fit_error_minimizing_noise(images, labels, config, 10)
    paused = fit_error_minimizing_noise(images, labels, config, 10, state_dir=tmp_path, max_iterations=3)
    assert not paused.done and paused.iterations == 3 and (tmp_path / "state.pt").exists()
    resumed = fit_error_minimizing_noise(images, labels, config, 10, state_dir=tmp_path)
    assert resumed.done and torch.equal(resumed.delta, uninterrupted.delta)
    assert not torch.equal(paused.delta, uninterrupted.delta), "the pause changed nothing: the test is void"
    assert (tmp_path / "noise.pt").exists() and not (tmp_path / "state.pt").exists()
    assert torch.equal(fit_error_minimizing_noise(images, labels, config, 10, state_dir=tmp_path).delta, resumed.delta)


def test_a_fit_killed_during_a_noise_pass_resumes_to_the_same_noise(tiny, tmp_path, monkeypatch):
    images, labels = tiny[0][:64], tiny[1][:64]
    config = EMConfig(method="em", iterations=6, batch_size=16, train_steps=2, steps=2, chunk_size=16)
    uninterrupted = fit_error_minimizing_noise(images, labels, config, 10)
    original, calls = em_module._Fitter.noise_chunk, []

    def killed_on_the_sixth_chunk(self):
        calls.append(self.chunk)
        if len(calls) == 6:  # second pass, second chunk: the state on disk is mid-pass
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(em_module._Fitter, "noise_chunk", killed_on_the_sixth_chunk)
    with pytest.raises(KeyboardInterrupt):
        fit_error_minimizing_noise(images, labels, config, 10, state_dir=tmp_path, save_every=0)
    monkeypatch.setattr(em_module._Fitter, "noise_chunk", original)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["chunk"] == 1
    resumed = fit_error_minimizing_noise(images, labels, config, 10, state_dir=tmp_path)
    assert torch.equal(resumed.delta, uninterrupted.delta)


def test_transform_adds_the_noise_by_global_index(tiny, em_fit, tmp_path):
    images, labels = tiny
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    split = datasets.Dataset.from_dict({"img": tensor_to_png_images(images), "label": labels.tolist()},
                                       features=features)
    transform = EMTransform(images, em_fit, EMConfig(method="em"), return_stats=True)
    protected = load_shards(protect_split(split, transform, tmp_path, "RGB", shard_size=100, batch_size=30))
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in protected["img"]])
    assert torch.equal(pixels.short(), images.short() + em_fit.delta)
    assert max(protected["linf"]) <= 8
    other = torch.flip(images[:4], dims=[3]).float() / 255
    with pytest.raises(ValueError, match="fitted on the training split"):
        transform.protect(other, labels[:4], torch.arange(4))


@pytest.mark.parametrize("method", ["em", "rem"])
def test_protect_publishes_fitted_noise_within_budget(loopback_hub, accelerator, tmp_path, method):
    arguments = EMArguments(em_iterations=4, rem_iterations=4, em_batch_size=20, em_train_steps=2, em_steps=2, em_chunk_size=20,
                            rem_eot=1, rem_attack_steps=1)
    args = ProtectArguments(method=method, eps=4, shard_size=20)
    data = DataArguments(dataset="cifar10", max_train_samples=40, max_eval_samples=10)
    run = RunArguments(output_dir=str(tmp_path), preset="cpu")
    results = run_protection(args, data, SourceTrainingConfig(), run, accelerator, method_args=[arguments])
    assert results["protected_splits"] == ["train"] and 0 < results["max_linf"] <= 4
    assert results["steps"] == 2 and results["config"]["model"] == "smallnet_cifar"  # flag, then preset
    assert results["fit"]["iterations"] == 4 and json.loads((tmp_path / "results.json").read_text())["eps"] == 4
    assert list(tmp_path.glob(f"cache/{method}-*/noise.pt"))
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert "L-inf budget eps = 4/255, 2 steps of 4/255" in card and em_module.PAPERS[method]["url"] in card
    args.protect_splits = ["test"]
    with pytest.raises(ValueError, match="fitted on the training split only"):
        run_protection(args, data, SourceTrainingConfig(), run, accelerator, method_args=[arguments])
