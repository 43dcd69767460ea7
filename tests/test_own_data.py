"""A data owner's own dataset: native resolution, odd image files, train-only layouts, no local paths.

Each test is built from a small input like the files people report trouble with (many from
../shared/qa/inputs, run as their README says) and checks what a user of the published copy sees.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import CIFAR10_DIR, REPO_ROOT, SHARED_DIR, launch_command
from huggingface_hub import HfApi
from PIL import Image

from sep_hf.arguments import HubArguments, RunArguments
from sep_hf.data.images import decode_image
from sep_hf.data.load import DatasetError
from sep_hf.data.view import DataArguments, load_training_data
from sep_hf.protect.job import ProtectArguments, run_protection
from sep_hf.protect.methods.cuda import CUDAArguments
from sep_hf.protect.methods.sep import SEPArguments, present_targets
from sep_hf.source.recipe import SourceTrainingConfig
from sep_hf.testing.photos import build_photo_folder

QA_INPUTS = SHARED_DIR / "qa" / "inputs"
EPS = 8


def qa_input(builder: str, folder: Path, *args) -> Path:
    """Run one of ../shared/qa/inputs' builders (from its folder, with this Python) into ``folder``."""
    subprocess.run([sys.executable, builder, str(folder), *args], cwd=QA_INPUTS, check=True, capture_output=True,
                   env={**os.environ, "SEP_HF_CIFAR": str(CIFAR10_DIR)})
    return folder


def protect(dataset, output_dir, accelerator, checkpoints=None, method="sep-fa-vr", push_to=None, **data):
    method_args = [SEPArguments(steps=2, checkpoints=checkpoints and str(checkpoints), num_models=2)]
    if method == "cuda":
        method_args = [CUDAArguments(cuda_key="12345")]
    return run_protection(
        ProtectArguments(method=method, eps=EPS if method != "cuda" else None, shard_size=16, craft_batch_size=16,
                         push_to_hub=push_to is not None, hub_dataset_id=push_to),
        DataArguments(dataset=str(dataset), **data),
        SourceTrainingConfig(epochs=1, num_checkpoints=1, batch_size=16),
        RunArguments(output_dir=str(output_dir), preset="cpu"), accelerator, method_args)


def pixels(image: Image.Image, mode: str) -> np.ndarray:
    return np.asarray(image.convert(mode), dtype=np.int16)


def assert_no_local_path(folder: Path, *needles: str) -> None:
    for path in Path(folder).rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for needle in needles:
                assert needle.encode() not in content, f"{needle} leaked into {path}"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An owner's photo folder: 40 CIFAR-10 images upscaled to 40..72 px per side (JPEG), train only."""
    return build_photo_folder(CIFAR10_DIR, tmp_path_factory.mktemp("owner") / "photos", 40, 40, 72)


def test_photo_folder_is_published_at_native_resolution_through_the_hub(photos, tmp_path, tiny_source_run,
                                                                          accelerator, loopback_hub, unique_repo_id):
    repo = unique_repo_id("photos-sep")
    results = protect(photos, tmp_path / "run", accelerator, checkpoints=tiny_source_run, push_to=repo,
                      image_size=[32])
    source = datasets.load_dataset(str(photos))["train"]
    published = datasets.load_dataset(repo)["train"]  # from the (loopback) Hub, as a user reads it
    assert published.num_rows == source.num_rows == 40
    assert len({image.size for image in source["image"]}) > 20  # the input really is of mixed sizes
    worst = []
    for before, after in zip(source, published):
        assert after["image"].size == before["image"].size  # native resolution, not the model's 32 px
        assert after["label"] == before["label"]
        worst.append(int(np.abs(pixels(after["image"], "RGB") - pixels(before["image"], "RGB")).max()))
    assert 0 < max(worst) <= EPS and min(worst) > 0
    assert results["image_size"] == [32, 32] and results["resolution"].startswith("native: every image")
    card = (tmp_path / "run" / "dataset" / "README.md").read_text()
    assert "resolution: native: every image is protected and published at its own size" in card
    assert_no_local_path(tmp_path / "run" / "dataset", str(photos), str(tmp_path))
    # the size growth, JPEGs as stored against the PNG rows published (the parquet files, within a few percent)
    size = results["size"]
    assert size["source_bytes"] == sum(path.stat().st_size for path in Path(photos).rglob("*.jpg"))
    parquet = sum(path.stat().st_size for path in (tmp_path / "run" / "dataset" / "data").glob("*.parquet"))
    assert abs(size["published_bytes"] - parquet) < 0.1 * parquet and size["ratio"] > 1
    assert (f"- size: {size['published_bytes'] / 1e6:.1f} MB published for {size['source_bytes'] / 1e6:.1f} MB of source "
            f"images ({size['ratio']:.1f}x)") in card


def test_mixed_sizes_without_a_model_size_is_one_clear_line_before_compute(photos, tmp_path):
    command = ["recipes/protect.py", "--dataset", str(photos), "--preset", "cpu", "--output_dir", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--image_size S" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "source").exists()  # nothing trained
    # Through `accelerate launch` the same line is printed (accelerate adds its own traceback unless -q)
    launched = subprocess.run(launch_command("protect.py", command[1:]), capture_output=True, text=True, timeout=300)
    assert launched.returncode != 0 and last in launched.stderr and "sep_hf/" not in launched.stderr


def test_train_only_folder_holds_out_part_for_evaluation(photos):
    data = load_training_data(DataArguments(dataset=str(photos), image_size=[24, 24]))
    assert data.eval_split == "train (10% held out)"
    assert (len(data.train_labels), len(data.eval_labels)) == (36, 4)
    assert tuple(data.train_images.shape[1:]) == (3, 24, 24) and tuple(data.eval_images.shape[1:]) == (3, 24, 24)


def test_validation_split_is_found_when_test_is_absent(tmp_path):
    folder = qa_input("b12_validation_split.py", tmp_path / "b12")
    data = load_training_data(DataArguments(dataset=str(folder)))
    assert data.eval_split == "validation"


def test_model_view_decoded_per_batch_trains_the_same_source(photos, tmp_path, accelerator):
    """--keep_in_memory_mb 0 (ImageRows, decoded per batch) gives the in-memory run's exact weights."""
    from safetensors.torch import load_file

    from sep_hf.data.view import ImageRows
    from sep_hf.source.train import train_source

    weights = []
    for budget in (4096, 0):
        data = load_training_data(DataArguments(dataset=str(photos), image_size=[24], keep_in_memory_mb=budget))
        assert isinstance(data.train_images, ImageRows) == (budget == 0)
        config = SourceTrainingConfig(epochs=2, num_checkpoints=1, batch_size=12)
        from sep_hf.utils.presets import apply_preset

        apply_preset("cpu", config)
        train_source(config, data, tmp_path / str(budget), accelerator)
        weights.append(load_file(tmp_path / str(budget) / "checkpoints" / "epoch-002" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)


def test_16_bit_png_is_scaled_to_8_bits_not_published_white(tmp_path, tiny_source_run, accelerator):
    folder = qa_input("b02_png16.py", tmp_path / "b02")
    protect(folder, tmp_path / "run", accelerator, checkpoints=tiny_source_run, max_train_samples=16,
            max_eval_samples=8)
    source = datasets.load_dataset(str(folder))
    published = datasets.load_dataset(str(tmp_path / "run" / "dataset"))
    for name in ("train", "test"):
        for before, after in zip(source[name].select(range(8)), published[name]):
            grey = np.rint(np.asarray(before["img"], dtype=np.float64) / 257)  # the 16-bit level scaled to 8 bits
            assert after["img"].mode == "L"
            assert np.abs(np.asarray(after["img"], dtype=np.int16) - grey).max() <= EPS


def test_float_and_deep_integer_images_are_scaled_or_refused():
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    decoded = decode_image(Image.fromarray(values, mode="F"))
    np.testing.assert_array_equal(np.asarray(decoded), np.rint(values * 255).astype(np.uint8))
    with pytest.raises(DatasetError, match="row 3 .* only \\[0, 1\\] has one meaning"):
        decode_image(Image.fromarray(values * 4, mode="F"), row=3)
    with pytest.raises(DatasetError, match="outside 16 bits"):
        decode_image(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), mode="I"))
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(decode_image(sixteen)).max() == 255


def test_exif_orientation_is_applied_as_load_dataset_shows_it():
    image = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    value = {"bytes": buffer.getvalue(), "path": None}
    shown = datasets.Image().decode_example(value)
    assert shown.size == (6, 4)
    np.testing.assert_array_equal(np.asarray(decode_image(value)), np.asarray(shown))


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_truncated_image_is_a_dataset_error_naming_split_and_row(tmp_path, kind):
    folder = qa_input("b07_truncated_jpeg.py", tmp_path / "b07", kind)
    with pytest.raises(DatasetError, match="row 5 of column 'img' of split 'train' cannot be decoded"):
        load_training_data(DataArguments(dataset=str(folder)))


def test_decompression_bomb_is_a_dataset_error_naming_split_and_row(tmp_path, monkeypatch):
    folder = qa_input("b00_baseline_rgb.py", tmp_path / "b00")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 // 4)  # 32x32 is to this what 20000x20000 is to the default
    with pytest.raises(DatasetError, match="row 0 of column 'img' of split 'train' is too large to decode safely"):
        load_training_data(DataArguments(dataset=str(folder)))


def test_label_outside_the_classes_is_refused_before_compute(tmp_path, accelerator, tiny_source_run):
    folder = qa_input("b21_bad_labels.py", tmp_path / "b21", "oob")
    with pytest.raises(DatasetError, match="Row 7 of split 'train' has label 12, outside the 10 classes"):
        protect(folder, tmp_path / "run", accelerator, checkpoints=tiny_source_run)
    assert not (tmp_path / "run" / "shards").exists()


def test_unprotected_split_of_a_local_folder_carries_its_bytes(tmp_path, accelerator):
    folder = qa_input("b16_imagefolder_numeric.py", tmp_path / "b16")  # ImageFolder: rows hold local paths
    protect(folder, tmp_path / "run", accelerator, method="cuda")  # CUDA protects the training split only
    published = tmp_path / "run" / "dataset"
    table = datasets.Dataset.from_parquet(str(next((published / "data").glob("test-*.parquet"))))
    raw = table.cast_column("image", datasets.Image(decode=False))["image"]
    assert all(row["bytes"] for row in raw) and not any("/" in (row["path"] or "") for row in raw)
    assert_no_local_path(published, str(folder))
    shown = datasets.load_dataset(str(published))["test"][0]["image"]
    assert shown.size == (32, 32)


def test_victim_results_and_card_name_local_folders_by_name_only(photos, tmp_path):
    from sep_hf.victim.job import VictimArguments, run_victim
    from sep_hf.victim.trainer import VictimTrainingConfig

    test_folder = build_photo_folder(CIFAR10_DIR, tmp_path / "photos-test", 60, 40, 72, split="test", seed=1)
    config = VictimTrainingConfig(epochs=1, batch_size=12)
    results = run_victim(config, DataArguments(dataset=str(photos), eval_dataset=str(test_folder), image_size=[24]),
                         RunArguments(output_dir=str(tmp_path / "victim"), preset="cpu"), HubArguments(),
                         VictimArguments())
    assert results["dataset"] == "photos" and results["eval_dataset"] == "photos-test"
    assert results["eval_split"] == "test" and results["image_size"] == [24, 24]
    assert_no_local_path(tmp_path / "victim" / "model", str(tmp_path))
    assert str(tmp_path) not in (tmp_path / "victim" / "results.json").read_text()


def test_protecting_a_hub_repo_in_place_keeps_the_owners_card(tmp_path, accelerator, loopback_hub, unique_repo_id):
    folder = qa_input("b20_existing_hub_repo.py", tmp_path / "b20")
    repo = unique_repo_id("owner-photos")
    api = HfApi()
    api.create_repo(repo, repo_type="dataset")
    api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="dataset")
    protect(repo, tmp_path / "run", accelerator, method="cuda", push_to=repo)
    card = (Path(api.hf_hub_download(repo, "README.md", repo_type="dataset", local_dir=tmp_path / "dl"))).read_text()
    assert "OWNER-TEXT: these images were taken by our lab" in card and "@misc{ourlab2026" in card
    assert "license: cc-by-4.0" in card and "pretty_name: My photo collection" in card
    assert "protected with CUDA" in card and "sep-hf" in card
    assert "LICENSE.txt" in api.list_repo_files(repo, repo_type="dataset")
    # Protecting it again replaces the protection section instead of adding a second one
    protect(repo, tmp_path / "run2", accelerator, method="cuda", push_to=repo)
    again = Path(api.hf_hub_download(repo, "README.md", repo_type="dataset", local_dir=tmp_path / "dl2")).read_text()
    assert again.count("sep-hf protection: begin") == 1 and "OWNER-TEXT" in again


def test_sep_fa_run_targets_only_classes_that_have_training_images(tmp_path, accelerator, tiny_source_run, monkeypatch):
    import sep_hf.protect.methods.sep as sep_module

    source = datasets.load_dataset(str(CIFAR10_DIR), split="train").select(range(200))
    few = source.filter(lambda row: row["label"] in (0, 1, 2, 3)).select(range(24))
    folder = tmp_path / "four-classes"
    for name, split in (("train", few), ("test", few.select(range(8)))):
        (folder / "data").mkdir(parents=True, exist_ok=True)
        split.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    seen = []
    original = sep_module.craft_sep
    monkeypatch.setattr(sep_module, "craft_sep", lambda *a, **k: seen.append(k["targets"]) or original(*a, **k))
    protect(folder, tmp_path / "run", accelerator, checkpoints=tiny_source_run)
    assert seen and all(targets is not None and set(targets.tolist()) <= {0, 1, 2, 3} for targets in seen)
    assert all(int(targets[c]) != c for targets in seen for c in range(4))


def test_sep_targets_only_classes_that_have_training_images():
    counts = torch.tensor([3, 0, 2, 0, 5, 1, 1, 1, 0, 4])
    targets = present_targets(counts)
    present = set(counts.nonzero().squeeze(1).tolist())
    assert set(targets.tolist()) <= present
    assert all(int(targets[c]) != c for c in present)  # every present class is pushed to another one
    assert present_targets(torch.ones(10)) is None  # all present: g(y) = (y + 5) mod 10, as before
    with pytest.raises(ValueError, match="only 1 of 10 classes"):
        present_targets(torch.tensor([0, 5, 0, 0, 0, 0, 0, 0, 0, 0]))


CANVAS_SHAPES = [(40, 56), (48, 36), (32, 32)]


def _canvas_case(ensemble, method: str, steps: int):
    """Three images of different sizes, alone and in one zero-padded canvas, with SEP's inputs for them."""
    from sep_hf.protect.methods.sep import SEPConfig, target_classes

    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=generator).float() / 255 for h, w in CANVAS_SHAPES]
    canvas = torch.zeros(3, 3, 48, 56)
    for slot, image in enumerate(images):
        canvas[slot, :, : image.shape[1], : image.shape[2]] = image
    labels, indices = torch.tensor([1, 4, 7]), torch.tensor([10, 11, 12])
    width = ensemble.models[0].features(torch.zeros(1, 3, 32, 32)).shape[1]
    means = torch.randn(ensemble.num_models, 10, width, generator=generator)
    config = SEPConfig(method=method, eps=8 / 255, steps=steps, step_size=2 / 255, bf16=False)
    return images, canvas, labels, indices, means, config, target_classes(labels, ensemble.num_classes)


def _direction(ensemble, config, x, targets, means, sizes=None):
    """SEP's (non-VR) crafting direction at ``x``, the sum of the checkpoints' loss gradients, computed as
    ``craft_sep`` computes it (its private ``_grad``; through the canvas's ``RaggedResize`` when ``sizes`` is given)."""
    from sep_hf.models import RaggedResize
    from sep_hf.protect.methods.sep import _grad, _ViewedEnsemble

    if sizes is not None:
        ensemble = _ViewedEnsemble(ensemble, RaggedResize(sizes, x.shape[-2:], ensemble.models[0].input_size))
    means = means if config.uses_features else None
    return sum(_grad(ensemble, k, x, targets, means, bf16=False) for k in range(ensemble.num_models))


@pytest.mark.parametrize("method", ["sep", "sep-fa"])
def test_a_signed_step_on_a_canvas_differs_from_alone_only_where_the_gradient_is_float_noise(tiny_ensemble, method):
    """Images of different sizes crafted together in a zero-padded canvas (RaggedResize, matmuls) or each alone
    (interpolate). The canvas gives each image its gradient to float rounding (|D_t - D_a| <= 1e-3 max |D_a|), zero
    on the padding; a signed step then differs only where D_t and D_a differ in sign, hence |D_a| <= |D_t - D_a|
    there: a proven bound, not a share of pixels. Which pixels flip depends on the CPU's rounding (an AMX host
    flips others than an AVX2 one); that only near-zero gradients can flip does not. (Over several steps flips
    compound, up to the budget: the next test checks what holds there.)"""
    from sep_hf.protect.methods.sep import craft_sep

    images, canvas, labels, indices, means, config, targets = _canvas_case(tiny_ensemble, method, steps=1)
    sizes = torch.tensor(CANVAS_SHAPES)
    together = craft_sep(canvas, labels, tiny_ensemble, config, indices, means, sizes=sizes)
    direction_together = _direction(tiny_ensemble, config, canvas, targets, means, sizes)
    assert direction_together[0, :, 40:].abs().max() == 0 and direction_together[1, :, :, 36:].abs().max() == 0
    for slot, image in enumerate(images):
        height, width = image.shape[1:]
        alone = craft_sep(image[None], labels[slot : slot + 1], tiny_ensemble, config, indices[slot : slot + 1], means)[0]
        direction_alone = _direction(tiny_ensemble, config, image[None], targets[slot : slot + 1], means)[0]
        gap = (direction_together[slot, :, :height, :width] - direction_alone).abs()
        assert gap.max() <= 1e-3 * direction_alone.abs().max(), (slot, gap.max())
        assert ((alone - image).abs() * 255).round().max() == 2  # the step moved the pixels, by 2 levels
        flipped = together[slot, :, :height, :width] != alone
        assert (direction_alone.abs()[flipped] <= gap[flipped]).all(), (slot, int(flipped.sum()))
    assert together[0, :, 40:].abs().max() == 0 and together[1, :, :, 36:].abs().max() == 0  # padding untouched


@pytest.mark.parametrize("method", ["sep", "sep-fa-vr"])
def test_images_of_different_sizes_crafted_together_stay_within_their_budget(tiny_ensemble, method):
    """Several steps (SEP-FA-VR's inner steps included) on a canvas: each image moved, within eps, on the 1/255
    grid; the padding untouched."""
    from sep_hf.protect.methods.sep import craft_sep

    images, canvas, labels, indices, means, config, _ = _canvas_case(tiny_ensemble, method, steps=3)
    together = craft_sep(canvas, labels, tiny_ensemble, config, indices, means, sizes=torch.tensor(CANVAS_SHAPES))
    for slot, image in enumerate(images):
        crop = together[slot, :, : image.shape[1], : image.shape[2]]
        assert 0 < ((crop - image).abs().amax() * 255).round() <= 8
        assert torch.equal(crop, (crop * 255).round() / 255)
    assert together[0, :, 40:].abs().max() == 0 and together[1, :, :, 36:].abs().max() == 0  # padding untouched


def test_dataset_map_adapter_protects_photos_of_mixed_sizes(photos, tiny_ensemble):
    """The README's Python use: ``dataset.map(SEPTransform(...))`` on a folder of mixed sizes."""
    from sep_hf.protect.methods.sep import SEPConfig, SEPTransform

    source = datasets.load_dataset(str(photos))["train"].select(range(12))
    means = torch.zeros(tiny_ensemble.num_models, 10, tiny_ensemble.models[0].features(torch.zeros(1, 3, 32, 32)).shape[1])
    transform = SEPTransform(tiny_ensemble, SEPConfig(method="sep-fa", eps=8 / 255, steps=2, step_size=4 / 255),
                             class_means=means, image_column="image", label_column="label")
    protected = source.map(transform, batched=True, batch_size=6, with_indices=True)
    for before, after in zip(source, protected):
        assert after["image"].size == before["image"].size
        assert 0 < np.abs(pixels(after["image"], "RGB") - pixels(before["image"], "RGB")).max() <= EPS
