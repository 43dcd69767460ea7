"""Image modes end to end: an L dataset is crafted on one channel and published L, RGBA keeps its alpha.

Real data: the first CIFAR-10 images of the shared folder, converted to L (and to RGBA with a
non-trivial alpha), written as Hub-layout folders; the protection job runs on them in-process
(source trained here for L, so its models have a one-channel stem) and the published folder is
read back with ``datasets.load_dataset``. A victim then trains on the published L dataset.
"""
from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pytest
import torch
from conftest import CIFAR10_DIR, load_folder
from PIL import Image

from sep_hf.arguments import HubArguments, RunArguments
from sep_hf.data.images import convert_mode, images_to_uint8, split_alpha, tensor_to_png_images
from sep_hf.data.view import DataArguments
from sep_hf.protect.job import ProtectArguments, run_protection
from sep_hf.protect.methods.sep import SEPArguments
from sep_hf.publish.folder import write_hub_layout
from sep_hf.source.recipe import SourceTrainingConfig

EPS = 8
COUNTS = {"L": {"train": 200, "test": 50}, "RGBA": {"train": 60, "test": 20}}


def _alpha(index: int, size=(32, 32)) -> np.ndarray:
    """A per-image alpha with fully transparent, fully opaque and partial pixels."""
    rows, cols = np.mgrid[: size[0], : size[1]]
    alpha = (rows * 8 + cols * 3 + index * 17) % 256
    alpha[:4] = 0
    alpha[-4:] = 255
    return alpha.astype(np.uint8)


def _converted_folder(folder, mode: str):
    """The first CIFAR-10 rows of each split converted to ``mode``, as a Hub-layout folder."""
    from huggingface_hub import DatasetCardData

    source = datasets.load_dataset(str(CIFAR10_DIR))
    splits = {}
    for name, count in COUNTS[mode].items():
        rows = source[name].select(range(count))
        images = []
        for index, image in enumerate(rows["img"]):
            if mode == "L":
                images.append(image.convert("L"))
            else:
                images.append(Image.fromarray(np.dstack([np.asarray(image.convert("RGB")), _alpha(index)])))
        splits[name] = datasets.Dataset.from_dict({"img": images, "label": rows["label"]}, features=rows.features)
    write_hub_layout(datasets.DatasetDict(splits), folder, DatasetCardData(), f"CIFAR-10 converted to {mode}.")
    return folder


def _pixels(split) -> np.ndarray:
    return np.stack([np.asarray(image).reshape(32, 32, -1) for image in split["img"]]).astype(np.int16)


def _check_published(source_dir, output_dir, mode: str, protected_splits):
    """Same features and rows, every image in ``mode``, alpha identical, 0 < max |delta| <= eps on colour."""
    source = load_folder(source_dir)
    published = load_folder(output_dir / "dataset")
    assert set(published) == set(COUNTS[mode])
    for name, count in COUNTS[mode].items():
        assert published[name].features == source[name].features
        assert published[name].num_rows == count and published[name]["label"] == source[name]["label"]
        assert {image.mode for image in published[name]["img"]} == {mode}
        before, after = _pixels(source[name]), _pixels(published[name])
        colours = 1 if mode.startswith("L") else 3
        np.testing.assert_array_equal(after[..., colours:], before[..., colours:])  # alpha untouched
        delta = np.abs(after[..., :colours] - before[..., :colours])
        if name in protected_splits:
            assert 0 < delta.max() <= EPS, (name, delta.max())
        else:
            assert delta.max() == 0
    results = json.loads((output_dir / "results.json").read_text())
    assert results["image_mode"] == mode and 0 < results["max_linf"] <= EPS
    assert f"images keep the source's mode `{mode}`" in (output_dir / "dataset" / "README.md").read_text()
    grid = Image.open(output_dir / "dataset" / "sample_grid.png")
    assert grid.mode == "RGB" and grid.size[0] > 0
    return results


@pytest.fixture(scope="module")
def gray_dir(tmp_path_factory):
    return _converted_folder(tmp_path_factory.mktemp("cifar10-gray"), "L")


@pytest.fixture(scope="module")
def rgba_dir(tmp_path_factory):
    return _converted_folder(tmp_path_factory.mktemp("cifar10-rgba"), "RGBA")


def _protect(dataset_dir, output_dir, mode, accelerator, source=None, checkpoints=None, **sep):
    counts = COUNTS[mode]
    return run_protection(
        ProtectArguments(method="sep", eps=EPS, splits=["train", "test"]),
        DataArguments(dataset=str(dataset_dir), max_train_samples=counts["train"], max_eval_samples=counts["test"]),
        source or SourceTrainingConfig(epochs=2, num_checkpoints=2, batch_size=50),
        RunArguments(output_dir=str(output_dir), preset="cpu"), accelerator,
        [SEPArguments(steps=2, checkpoints=checkpoints and str(checkpoints), **sep)])


@pytest.fixture(scope="module")
def gray_run(gray_dir, tmp_path_factory, accelerator):
    output_dir = tmp_path_factory.mktemp("protect-gray")
    _protect(gray_dir, output_dir, "L", accelerator)
    return output_dir


# ----------------------------------------------------------------------------------------------
# decoding and encoding keep the mode


def test_decode_keeps_each_mode_and_png_round_trips():
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (4, 5), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (4, 5, 4), dtype=np.uint8))
    gray_alpha = Image.fromarray(rng.integers(0, 256, (4, 5, 2), dtype=np.uint8))
    assert images_to_uint8([gray, gray], mode=None).shape == (2, 1, 4, 5)
    assert images_to_uint8([gray], mode="RGB").shape == (1, 3, 4, 5)  # the historical default is unchanged
    for batch, mode in (([gray, rgb], "RGB"), ([rgba, gray], "RGBA"), ([gray_alpha, gray], "LA"),
                        ([gray_alpha, rgb], "RGBA")):
        tensor = images_to_uint8(batch, mode=None)
        expected = np.stack([np.asarray(image.convert(mode)).reshape(4, 5, -1) for image in batch])
        np.testing.assert_array_equal(tensor.permute(0, 2, 3, 1).numpy(), expected)  # what PIL's convert gives
    both = images_to_uint8([rgb, rgba], mode=None)
    luma = np.stack([np.asarray(rgb.convert("L")), np.asarray(rgba.convert("RGB").convert("L"))])
    np.testing.assert_array_equal(convert_mode(both, "L")[:, 0].numpy(), luma)  # PIL's luma, bit for bit
    for image in (gray, gray_alpha, rgb, rgba):
        colour, alpha = split_alpha(images_to_uint8([image], mode=None))
        png = Image.open(io.BytesIO(tensor_to_png_images(colour.float() / 255, alpha)[0]["bytes"]))
        assert png.mode == image.mode and np.array_equal(np.asarray(png), np.asarray(image))


# ----------------------------------------------------------------------------------------------
# L: one channel from source training to the published dataset, and a victim trained on it


def test_grayscale_is_crafted_on_one_channel_and_published_l(gray_dir, gray_run):
    results = _check_published(gray_dir, gray_run, "L", {"train", "test"})
    record = json.loads(next((gray_run / "source" / "checkpoints").glob("epoch-*/record.json")).read_text())
    assert len(record["model"]["mean"]) == 1  # the source saw one channel ...
    from sep_hf import CheckpointEnsemble

    ensemble = CheckpointEnsemble.from_pretrained(gray_run / "source")
    assert ensemble.in_chans == 1 and ensemble.models[0].backbone.stem[0].in_channels == 1  # ... with a 1-channel stem
    assert results["splits"]["train"]["num_examples"] == COUNTS["L"]["train"]


def test_a_victim_trains_on_the_published_grayscale_dataset(gray_run, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from sep_hf.victim.job import VictimArguments, run_victim
    from sep_hf.victim.trainer import VictimTrainingConfig

    published = gray_run / "dataset"
    results = run_victim(VictimTrainingConfig(model="smallnet_cifar", epochs=1, batch_size=50),
                         DataArguments(dataset=str(published), max_train_samples=200, max_eval_samples=50),
                         RunArguments(output_dir=str(tmp_path / "victim"), preset="cpu"), HubArguments(),
                         VictimArguments())
    assert results["num_train"] == 200 and 0 <= results["eval_accuracy"] <= 1
    assert len(results["normalization"]["mean"]) == 1
    model_dir = tmp_path / "victim" / "model"
    import sep_hf.models  # noqa: F401  registers smallnet_cifar with timm

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    image = load_folder(published)["test"][0]["img"]
    assert image.mode == "L"
    inputs = processor(image)  # a published L image goes through the saved processor as is
    assert inputs["pixel_values"].shape == (1, 1, 32, 32)
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, 10)


# ----------------------------------------------------------------------------------------------
# RGBA: RGB crafted, alpha copied; checkpoints of another channel count


def test_rgba_keeps_its_alpha_and_the_budget(rgba_dir, gray_run, tmp_path, accelerator):
    output_dir = tmp_path / "rgba"
    _protect(rgba_dir, output_dir, "RGBA", accelerator, source=SourceTrainingConfig(epochs=1, num_checkpoints=1,
                                                                                     batch_size=50))
    _check_published(rgba_dir, output_dir, "RGBA", {"train", "test"})
    from sep_hf import CheckpointEnsemble
    from sep_hf.protect.methods.sep import SEPConfig, craft_sep

    rgb_ensemble = CheckpointEnsemble.from_pretrained(output_dir / "source")  # trained on the colour channels
    assert rgb_ensemble.in_chans == 3
    # RGB checkpoints also craft grey images (grey on R, G and B): one channel comes back
    gray = torch.rand(4, 1, 32, 32).mul(255).round().div(255)
    crafted = craft_sep(gray, torch.arange(4), rgb_ensemble, SEPConfig(method="sep", steps=2, eps=EPS / 255))
    assert crafted.shape == gray.shape and 0 < (crafted - gray).abs().max() * 255 <= EPS + 1e-4
    # one-channel checkpoints cannot see colour: refused before crafting
    with pytest.raises(ValueError, match="take 1-channel images but dataset .* is RGBA"):
        _protect(rgba_dir, tmp_path / "mismatch", "RGBA", accelerator, checkpoints=gray_run / "source")
    assert not (tmp_path / "mismatch" / "shards").exists()
