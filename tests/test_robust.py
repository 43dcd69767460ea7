"""sep-robust: differentiable views match the defenses, draws are per example, the perturbation space,
budget, determinism, batch-split invariance, and 1 vs 2 processes through protect.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import load_folder, run_recipe

from sep_hf import squeezes
from sep_hf.data.images import quantize
from sep_hf.protect import get_protection
from sep_hf.protect.eot import VIEWS, apply_views, lowpass_direction, parse_views
from sep_hf.protect.methods.sep import SEPConfig, craft_sep
from sep_hf.seeding import draw_keys

ALL_VIEWS = ("jpeg", "grayscale", "blur", "bitdepth", "noise", "augment")


@pytest.fixture(scope="module")
def real_images(cifar_small):
    return cifar_small.eval_images[:64]


@pytest.fixture(scope="module")
def batch(cifar_small):
    # kept away from 0 and 1 so clamping to the pixel range never breaks a block or channel pattern
    images = quantize(cifar_small.train_images[:24].float() / 255 * 0.8 + 0.1).float() / 255
    return images, cifar_small.train_labels[:24]


@pytest.fixture(scope="module")
def means(tiny_ensemble, cifar_small, tmp_path_factory):
    return tiny_ensemble.class_means(cifar_small.train_images, cifar_small.train_labels,
                                     cache_dir=tmp_path_factory.mktemp("means"))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a.float() - b.float()).pow(2).mean()))


def test_views_match_the_defenses_squeezes_on_real_images(real_images):
    """The float views the crafting sees stay close to the uint8 squeezes the victim trains on."""
    x = real_images.float() / 255
    assert _psnr(squeezes.jpeg(x, 10), squeezes.jpeg(real_images, 10).float() / 255) > 30  # measured 35.3 dB
    assert (squeezes.grayscale(x) * 255 - squeezes.grayscale(real_images).float()).abs().max() <= 0.5 + 1e-4
    assert (squeezes.gaussian_blur(x, 1.0) * 255 - squeezes.gaussian_blur(real_images, 1.0).float()).abs().max() <= 0.5 + 1e-3
    assert torch.equal(quantize(squeezes.bit_depth(x, 4)), squeezes.bit_depth(real_images, 4))


@pytest.mark.parametrize("name", ALL_VIEWS)
def test_every_view_changes_the_image_and_passes_a_finite_nonzero_gradient(real_images, name):
    x = (real_images.float() / 255).requires_grad_(True)
    keys = draw_keys(torch.arange(len(x)), 0, 1, 2)
    viewed = VIEWS[name](x, keys)
    assert viewed.shape == x.shape and (viewed - x).abs().mean() > 1e-3
    gradient = torch.autograd.grad((viewed * torch.randn_like(viewed)).sum(), x)[0]
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_draws_depend_on_the_example_not_on_the_batch(real_images):
    x = real_images.float() / 255
    keys = draw_keys(torch.arange(100, 164), 3)
    whole = apply_views(x, keys, ALL_VIEWS)
    halves = torch.cat([apply_views(x[:20], keys[:20], ALL_VIEWS), apply_views(x[20:], keys[20:], ALL_VIEWS)])
    assert torch.equal(whole, halves)
    other_seed = apply_views(x, draw_keys(torch.arange(100, 164), seed=4), ALL_VIEWS)
    assert not torch.equal(whole, other_seed)
    picked = {name: (apply_views(x, keys, (name,)) != x).flatten(1).any(1) for name in ALL_VIEWS}
    assert all(0 < int(changed.sum()) < len(x) for changed in picked.values()), "identity must be drawn too"


def test_unknown_view_is_a_clear_error():
    assert parse_views("jpeg, noise") == ("jpeg", "noise") and parse_views("none") == ()
    with pytest.raises(ValueError, match="Unknown craft transform.*jpg"):
        parse_views("jpeg,jpg")


def test_lowpass_direction_is_block_constant_and_channel_shared():
    direction = lowpass_direction(torch.randn(3, 3, 32, 32), block=4, shared_channels=True)
    assert torch.equal(direction[:, 0], direction[:, 1]) and torch.equal(direction[:, 0], direction[:, 2])
    blocks = direction.unfold(2, 4, 4).unfold(3, 4, 4)  # (N, C, 8, 8, 4, 4)
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))
    odd = lowpass_direction(torch.randn(1, 1, 30, 30), block=4)
    assert odd.shape == (1, 1, 30, 30)


@pytest.mark.parametrize("method", ["sep-fa", "sep-fa-vr"])
def test_robust_crafting_budget_space_determinism_and_batch_split(tiny_ensemble, batch, means, method):
    images, labels = batch
    config = SEPConfig(method=method, steps=2, step_size=4 / 255, craft_transforms=ALL_VIEWS, perturbation_block=2,
                       shared_channels=True, eot_samples=2 if method == "sep-fa" else 1)
    indices = torch.arange(500, 524)
    protected = craft_sep(images, labels, tiny_ensemble, config, indices=indices, class_means=means)
    delta = quantize(protected).int() - quantize(images).int()
    assert torch.equal(quantize(protected).float() / 255, protected) and delta.abs().max() <= 8
    assert delta.abs().float().mean() > 2, "the perturbation should use a good part of the 8/255 budget"
    assert torch.equal(delta[:, 0], delta[:, 1]) and torch.equal(delta[:, 1], delta[:, 2]), "channels not shared"
    blocks = delta.unfold(2, 2, 2).unfold(3, 2, 2)
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks)), "not constant over 2x2 blocks"
    halves = torch.cat([craft_sep(images[:10], labels[:10], tiny_ensemble, config, indices=indices[:10], class_means=means),
                        craft_sep(images[10:], labels[10:], tiny_ensemble, config, indices=indices[10:], class_means=means)])
    assert torch.equal(protected, halves), "a process's share of the batch (or a rerun) changed the output"
    plain = craft_sep(images, labels, tiny_ensemble, SEPConfig(method=method, steps=2, step_size=4 / 255),
                      indices=indices, class_means=means)
    assert not torch.equal(protected, plain)


def test_no_views_is_exactly_sep(tiny_ensemble, batch, means):
    """sep-robust's machinery with every piece off must not change SEP's output (bench/equivalence.py too)."""
    images, labels = batch
    base = SEPConfig(method="sep-fa-vr", steps=2)
    robust_off = SEPConfig(method="sep-fa-vr", steps=2, craft_transforms=(), eot_samples=3, perturbation_block=1)
    assert torch.equal(craft_sep(images, labels, tiny_ensemble, base, class_means=means),
                       craft_sep(images, labels, tiny_ensemble, robust_off, class_means=means))
    assert base.gradient_evaluations(6) == robust_off.gradient_evaluations(6) == 2 * 12
    assert SEPConfig(steps=2, craft_transforms=("jpeg",), eot_samples=3).gradient_evaluations(6) == 2 * 12 * 3


def _args(checkpoints, output_dir):
    return ["--dataset", "cifar10", "--preset", "cpu", "--checkpoints", checkpoints, "--num_models", 3,
            "--method", "sep-robust", "--craft_transforms", "jpeg,noise,augment", "--perturbation_block", 2,
            "--steps", 2, "--max_train_samples", 60, "--splits", "train", "--shard_size", 20,
            "--craft_batch_size", 20, "--output_dir", output_dir]


@pytest.mark.slow
def test_sep_robust_through_protect_py_is_the_same_for_one_and_two_processes(loopback_hub, tiny_source_run, tmp_path):

    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe("protect.py", _args(tiny_source_run, one))
    run_recipe("protect.py", _args(tiny_source_run, two), num_processes=2)
    results = json.loads((one / "results.json").read_text())
    assert results["method"] == "sep-robust" and results["base_method"] == "sep-fa" and results["grating_amplitude"] == 12
    assert 12 < results["max_linf"] <= 8 + 12, "the default grating goes beyond the budget, by its amplitude at most"
    assert results["craft_transforms"] == ["jpeg", "noise", "augment"] and results["perturbation_block"] == 2
    assert results["crafted_against"] == ["jpeg", "none", "rse"]  # augment's crop/flip is standard training
    assert json.loads((two / "results.json").read_text())["num_processes"] == 2
    card = (one / "dataset" / "README.md").read_text()
    assert "robust crafting on `sep-fa`" in card and "jpeg, noise, augment" in card
    assert "class-wise grating" in card and "eps + 12/255" in card
    assert "every pixel satisfies" not in card, "the grating goes beyond eps: the card must not claim every pixel is within it"
    assert f"within 8/255; the components beyond the budget listed above bring the largest change to {results['max_linf']}/255" in card

    def pixels(folder):
        return [row["img"].tobytes() for row in load_folder(folder / "dataset")["train"]]

    assert pixels(one) == pixels(two)


def test_sep_robust_is_registered_with_its_flags():
    cls = get_protection("sep-robust")
    assert cls.arguments.__name__ == "RobustArguments"
    with pytest.raises(ValueError, match="robust_base"):
        cls.arguments(robust_base="cuda")
    with pytest.raises(ValueError, match="Unknown craft transform"):
        cls.arguments(craft_transforms="jpeg,sharpen")


def _tiny(data, count=200):
    import dataclasses

    return dataclasses.replace(data, train_images=data.train_images[:count], train_labels=data.train_labels[:count],
                               eval_images=data.eval_images[:100], eval_labels=data.eval_labels[:100])


def test_source_trained_through_a_defense_uses_its_hooks(cifar_small, accelerator, tmp_path):
    """train_source --defense (a robust self-ensemble): the squeeze and the per-batch hook really run."""
    from conftest import tiny_source_config

    from sep_hf.defenses import build_defense, defense_arguments
    from sep_hf.defenses.at import ATArguments
    from sep_hf.source.checkpoints import list_checkpoints
    from sep_hf.source.train import train_source

    data = _tiny(cifar_small)
    states = {}
    for name, parsed in (("none", ()), ("jpeg", ()), ("at", (ATArguments(at_steps=2),))):
        config = tiny_source_config(epochs=1, num_checkpoints=1, defense=name)
        defense = build_defense(name, parsed)
        calls = []
        if name == "at":  # count the PGD batches the source loop asks the defense for
            original = defense.training_batch
            defense.training_batch = lambda *args, calls=calls, original=original: calls.append(1) or original(*args)
        train_source(config, data, tmp_path / name, accelerator, defense=defense)
        checkpoint = list_checkpoints(tmp_path / name)[-1]
        assert checkpoint.record["training_config"]["defense"] == name
        states[name] = checkpoint.load_state_dict()
        if name == "at":
            assert checkpoint.record["defense_settings"]["eps"] == 4.0 and len(calls) == len(data.train_images) // 25
    def differs(a, b):
        return any(not torch.equal(a[key], b[key]) for key in a)

    assert differs(states["none"], states["jpeg"]) and differs(states["none"], states["at"])
    with pytest.raises(ValueError, match="config.defense is 'jpeg'"):
        train_source(tiny_source_config(epochs=1, defense="jpeg"), data, tmp_path / "x", accelerator,
                     defense=build_defense("at", ()))
    assert len(defense_arguments()) >= 3


def test_classwise_share_moves_every_image_of_a_class_by_its_pattern(tiny_ensemble, batch, means):
    from sep_hf.protect.methods.sep import classwise_patterns

    images, labels = batch
    whole = SEPConfig(method="sep-fa", steps=2, step_size=2 / 255, classwise_share=1.0, classwise_block=4)
    protected = craft_sep(images, labels, tiny_ensemble, whole, class_means=means)
    patterns = classwise_patterns(0, 10, (32, 32), 4)
    delta = quantize(protected).int() - quantize(images).int()
    assert torch.equal(delta, (8 * patterns[labels]).int().expand_as(delta)), "share 1: the pattern alone, all 8 levels"
    assert not torch.equal(patterns[0], patterns[1]) and torch.equal(patterns, classwise_patterns(0, 10, (32, 32), 4))

    half = SEPConfig(method="sep-fa", steps=3, step_size=2 / 255, classwise_share=0.5)
    protected = craft_sep(images, labels, tiny_ensemble, half, class_means=means)
    delta = quantize(protected).int() - quantize(images).int()
    assert delta.abs().max() <= 8
    rest = delta - (4 * patterns[labels]).int()
    assert rest.abs().max() <= 4 and rest.abs().float().mean() > 1, "SEP crafts within the other half"


def test_jpeg_grid_moves_the_encoders_dc_level_to_the_chosen_side_within_budget(real_images):
    """The JPEG-grid step (sep-robust --jpeg_grid_quality): every pixel stays within the budget, and after the
    real encoder (PIL, quality 10) most pushed blocks decode a whole DC level (Q/8 = 10 levels) on the side
    the direction asks for."""
    from sep_hf.protect.methods.sep import jpeg_grid_step, luma_dc_step

    original = real_images.float() / 255
    generator = torch.Generator().manual_seed(0)
    side = torch.randint(0, 2, (len(original), 1, 4, 4), generator=generator).float() * 2 - 1
    direction = -side.repeat_interleave(8, -2).repeat_interleave(8, -1).expand(-1, 3, -1, -1)  # descend: +side
    out = jpeg_grid_step(original, original, 8 / 255, direction, 10)
    assert ((out - original).abs() * 255).round().max() <= 8 and torch.equal(out, (out * 255).round() / 255)

    def decoded_block_luma(x):
        y = (squeezes.jpeg(quantize(x), 10).float() * torch.tensor(squeezes.LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return F.avg_pool2d(y, 8)

    change = decoded_block_luma(out) - decoded_block_luma(original)
    pushed = F.max_pool2d(((out - original).abs().sum(1, keepdim=True) > 0).float(), 8) > 0
    moved = (change * side >= luma_dc_step(10) / 16)[pushed]
    assert pushed.float().mean() > 0.6 and moved.float().mean() > 0.7, (pushed.float().mean(), moved.float().mean())
    assert torch.equal(jpeg_grid_step(original, original, 8 / 255, torch.zeros_like(original), 10), original)


def test_class_gratings_keep_their_energy_at_their_class_frequencies_under_flip_and_crop():
    """Each class's grating puts most of its energy in its signature's FFT bins whatever the image's phase,
    and keeps it there after a horizontal flip or a 4-pixel-padded crop (what victims' augmentation does)."""
    from sep_hf.gratings import class_gratings, grating_signatures, signature_frequencies

    labels = torch.arange(10).repeat_interleave(8)
    gratings = class_gratings(labels, torch.arange(80), (32, 32), 10, seed=3)
    assert gratings.shape == (80, 1, 32, 32) and gratings.abs().max() <= 1 + 1e-6 and gratings.abs().max() > 0.9
    assert not torch.equal(gratings[0], gratings[1]), "each image its own phase"
    assert torch.equal(gratings, class_gratings(labels, torch.arange(80), (32, 32), 10, seed=3))
    signatures = grating_signatures(10, 3)
    assert signatures != grating_signatures(10, 4) and len(set(signatures)) == 10
    cropped = F.pad(gratings, (4, 4, 4, 4))[..., 2:34, 5:37]
    for label, signature in enumerate(signatures):
        bins = signature_frequencies((32, 32), [signature])
        for view in (gratings, gratings.flip(-1), cropped):
            power = torch.fft.fft2(view[labels == label, 0]).abs().pow(2)
            share = power[:, bins].sum(1) / power.flatten(1).sum(1)
            assert share.min() > 0.6, (signature, share.min())


def test_grating_amplitude_is_added_after_crafting_beyond_the_budget(tiny_ensemble, batch, means):
    from sep_hf.gratings import class_gratings

    images, labels = batch
    config = SEPConfig(method="sep-fa", steps=2, step_size=2 / 255)
    plain = craft_sep(images, labels, tiny_ensemble, config, class_means=means, indices=torch.arange(100, 124))
    config.grating_amplitude = 6
    with_grating = craft_sep(images, labels, tiny_ensemble, config, class_means=means, indices=torch.arange(100, 124))
    expected = (quantize(plain).float() + 6 * class_gratings(labels, torch.arange(100, 124), (32, 32), 10, 0)).round()
    assert torch.equal(quantize(with_grating).float(), expected.clamp(0, 255))
    linf = (quantize(with_grating).int() - quantize(images).int()).abs().max()
    assert 8 < linf <= 14
    with pytest.raises(ValueError, match="grating_amplitude"):
        SEPConfig(grating_amplitude=-1)


def test_pixel_shortcuts_are_set_after_crafting_and_grating(tiny_ensemble, batch, means):
    from sep_hf.pixel_shortcuts import class_pixels

    images, labels = batch
    config = SEPConfig(method="sep-fa", steps=2, step_size=2 / 255, grating_amplitude=6)
    plain = craft_sep(images, labels, tiny_ensemble, config, class_means=means, indices=torch.arange(100, 124))
    config.pixel_shortcuts = True
    marked = craft_sep(images, labels, tiny_ensemble, config, class_means=means, indices=torch.arange(100, 124))
    assert torch.equal(marked, class_pixels(plain, labels, 10, config.seed))
    assert ((marked != plain).any(1).flatten(1).sum(1) <= 1).all() and (marked != plain).any()


def test_sep_robust_refuses_more_classes_than_grating_signatures_before_crafting():
    from types import SimpleNamespace

    from sep_hf.protect.methods.robust import RobustArguments, SEPRobustTransform
    from sep_hf.protect.methods.sep import SEPArguments

    given = {RobustArguments: RobustArguments(), SEPArguments: SEPArguments(steps=2, step_size=2.0)}  # as a preset sets them
    context = SimpleNamespace(arguments=given.__getitem__, eps=8 / 255, seed=0, bf16=False,
                              columns=SimpleNamespace(num_classes=13))
    with pytest.raises(ValueError, match="12 class signatures .* 13 classes: pass --grating_amplitude 0"):
        SEPRobustTransform.config_from(context, "sep-robust")
    given[RobustArguments] = RobustArguments(grating_amplitude=0, pixel_shortcuts=True)
    with pytest.raises(ValueError, match="room for 12 classes .* 13: pass --pixel_shortcuts False"):
        SEPRobustTransform.config_from(context, "sep-robust")
    given[RobustArguments] = RobustArguments(grating_amplitude=0)
    assert SEPRobustTransform.config_from(context, "sep-robust").grating_amplitude == 0
    context.columns.num_classes = 10
    given[RobustArguments] = RobustArguments()
    assert SEPRobustTransform.config_from(context, "sep-robust").grating_amplitude == 12


def test_pixel_shortcuts_set_one_saturated_cell_per_class_inside_the_crop_margin():
    """sep_hf.pixel_shortcuts: one seeded (position, colour) per class, distinct positions 4 cells inside the
    border, same-coloured classes 12 cells apart; at 32x32 exactly one pixel changes, at 64x48 one block of 2 rows."""
    from sep_hf.pixel_shortcuts import MAX_CLASSES, SATURATED, class_pixels, pixel_signatures

    signatures = pixel_signatures(12, seed=5)
    assert signatures == pixel_signatures(12, seed=5) and signatures != pixel_signatures(12, seed=6)
    assert len({(r, c) for r, c, _ in signatures}) == 12 and all(4 <= r <= 27 and 4 <= c <= 27 for r, c, _ in signatures)
    for i, (r, c, rgb) in enumerate(signatures):
        assert rgb in SATURATED
        assert all(max(abs(r - r2), abs(c - c2)) >= 12 for r2, c2, rgb2 in signatures[i + 1:] if rgb2 == rgb)
    images, labels = torch.rand(12, 3, 32, 32), torch.arange(12)
    marked = class_pixels(images, labels, 12, seed=5)
    changed = (marked != images).any(1)
    assert changed.flatten(1).sum(1).tolist() == [1] * 12 and torch.equal(images, images.clone())
    for i, (r, c, rgb) in enumerate(signatures):
        assert torch.equal(marked[i, :, r, c], torch.tensor(rgb) / 255)
    padded = torch.rand(2, 3, 64, 64)  # a bucket holding a 64x48 image and a 32x32 one
    marked = class_pixels(padded, torch.tensor([0, 1]), 12, seed=5, sizes=torch.tensor([[64, 48], [32, 32]]))
    r, c, _ = signatures[0]
    block = (marked[0] != padded[0]).any(0).nonzero()
    assert set(block[:, 0].tolist()) == {2 * r, 2 * r + 1}
    assert set(block[:, 1].tolist()) == set(range(48 * c // 32, max(48 * (c + 1) // 32, 48 * c // 32 + 1)))
    assert (marked[1] != padded[1]).any(0).nonzero().tolist() == [[signatures[1][0], signatures[1][1]]]
    with pytest.raises(ValueError, match=f"room for {MAX_CLASSES} classes"):
        pixel_signatures(MAX_CLASSES + 1, seed=0)
