"""Data layer: dataset resolution, column detection, clear errors, lossless image <-> tensor."""
from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from conftest import CIFAR10_DIR
from PIL import Image

from sep_hf.data.images import images_to_uint8, quantize, tensor_to_png_images, uint8_to_float
from sep_hf.data.load import DatasetError, find_image_columns, load_image_dataset, resolve_dataset_name
from sep_hf.data.view import DataArguments, split_to_tensors


def _images(n=6, size=(8, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def _decode_png(item: dict) -> np.ndarray:
    image = Image.open(io.BytesIO(item["bytes"]))
    assert image.format == "PNG"
    return np.asarray(image)


def test_aliases_and_paths():
    assert resolve_dataset_name("cifar10") == "uoft-cs/cifar10"
    assert resolve_dataset_name("cifar100") == "uoft-cs/cifar100"
    assert resolve_dataset_name("someone/dataset") == "someone/dataset"
    assert resolve_dataset_name(str(CIFAR10_DIR)) == str(CIFAR10_DIR.resolve())
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_dataset_name("./no/such/folder")


def test_alias_loads_through_the_hub_with_revision(loopback_hub):
    dataset = load_image_dataset("cifar10")
    assert dataset.dataset_id == "uoft-cs/cifar10"
    assert len(dataset.revision) == 40
    assert dataset.columns.image == "img" and dataset.columns.label == "label"
    assert dataset.columns.class_names[:3] == ("airplane", "automobile", "bird")
    assert dataset.split("test").num_rows == 10_000


def test_local_hub_layout_folder_and_decode():
    dataset = load_image_dataset(str(CIFAR10_DIR))
    assert dataset.revision is None and dataset.columns.num_classes == 10
    images, labels = split_to_tensors(dataset.split("test"), dataset.columns, max_samples=64)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.max() < 10
    with pytest.raises(DatasetError, match="no split 'validation'"):
        dataset.split("validation")


def test_parquet_file_and_imagefolder(tmp_path):
    pixels = _images(4)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": [0, 1, 0, 1]},
                                    features=features)
    ds.to_parquet(tmp_path / "train.parquet")
    loaded = load_image_dataset(str(tmp_path / "train.parquet"))
    assert loaded.columns.image == "image"
    images, _ = split_to_tensors(loaded.split("train"), loaded.columns)
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), pixels)

    for index, array in enumerate(pixels):
        folder = tmp_path / "tree" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{index}.png")
    tree = load_image_dataset(str(tmp_path / "tree"))
    assert set(tree.columns.class_names) == {"cat", "dog"}


def test_folders_with_the_same_card_load_their_own_rows(tmp_path):
    # datasets keys a Hub-layout folder's cache on its name and README: without the resolved files
    # passed back, run2/dataset (or a rewritten run1/dataset) would load run1/dataset's cached rows.
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    loaded = []
    for seed in (0, 1):
        folder = tmp_path / f"run{seed}" / "dataset"
        (folder / "data").mkdir(parents=True)
        (folder / "README.md").write_text(card)
        pixels = _images(4, seed=seed)
        datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": [0, 1, 0, 1]},
                                   features=features).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
        dataset = load_image_dataset(str(folder))
        images, _ = split_to_tensors(dataset.split("train"), dataset.columns)
        np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), pixels)
        loaded.append(images)
    assert not torch.equal(*loaded)


def test_uint8_round_trip_is_exact():
    pixels = _images(8, size=(5, 7))
    tensor = images_to_uint8([Image.fromarray(p) for p in pixels])
    assert tensor.shape == (8, 3, 5, 7)
    back = np.stack([_decode_png(item) for item in tensor_to_png_images(uint8_to_float(tensor))])
    np.testing.assert_array_equal(back, pixels)


def test_quantize_rounds_not_truncates():
    levels = torch.tensor([10.0, 10.49, 10.51, 254.7, -3.0, 300.0]) / 255
    assert quantize(levels).tolist() == [10, 10, 11, 255, 0, 255]
    perturbed = torch.full((1, 3, 2, 2), 100.6 / 255)
    assert _decode_png(tensor_to_png_images(perturbed)[0]).max() == 101


def test_grayscale_rgba_palette_become_rgb():
    gray = Image.fromarray(np.full((4, 4), 77, dtype=np.uint8), mode="L")
    rgba = Image.fromarray(np.dstack([np.full((4, 4, 3), 10, np.uint8), np.zeros((4, 4), np.uint8)]), mode="RGBA")
    palette = Image.fromarray(_images(1, (4, 4))[0]).convert("P")
    tensor = images_to_uint8([gray, rgba, palette])
    assert tensor.shape == (3, 3, 4, 4)
    assert tensor[0].unique().tolist() == [77]
    assert tensor[1].unique().tolist() == [255]  # fully transparent pixels composite onto white


def test_mixed_sizes_need_resize():
    small, large = Image.fromarray(_images(1, (4, 4))[0]), Image.fromarray(_images(1, (6, 6))[0])
    with pytest.raises(DatasetError, match="different sizes.*--resize"):
        images_to_uint8([small, large], column="img")
    assert images_to_uint8([small, large], resize=(5, 5)).shape == (2, 3, 5, 5)


def _features(**columns):
    return datasets.Features(columns)


def test_column_errors_name_dataset_and_column():
    no_label = _features(img=datasets.Image(), label=datasets.Value("int64"))
    with pytest.raises(DatasetError, match=r"'my/ds' has no ClassLabel column.*label: Value"):
        find_image_columns(no_label, "my/ds")
    no_image = _features(text=datasets.Value("string"), label=datasets.ClassLabel(names=["a"]))
    with pytest.raises(DatasetError, match=r"'my/ds' has no Image column.*text"):
        find_image_columns(no_image, "my/ds")
    both = _features(img=datasets.Image(), text=datasets.Value("string"), label=datasets.ClassLabel(names=["a"]))
    with pytest.raises(DatasetError, match=r"Column 'text' of dataset 'my/ds' is .*not Image"):
        find_image_columns(both, "my/ds", image_column="text")
    with pytest.raises(DatasetError, match=r"no column 'pixels'"):
        find_image_columns(both, "my/ds", image_column="pixels")
    assert find_image_columns(both, "my/ds").image == "img"


def test_zero_rows_and_unknown_dataset(tmp_path, loopback_hub):
    features = _features(img=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))
    datasets.Dataset.from_dict({"img": [], "label": []}, features=features).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(DatasetError, match=r"Dataset '.*empty.parquet' has a split with zero rows"):
        load_image_dataset(str(tmp_path / "empty.parquet"))
    with pytest.raises(DatasetError, match=r"'nobody/nothing-here' was not found on the Hub"):
        load_image_dataset("nobody/nothing-here")


def test_data_arguments_validate():
    with pytest.raises(DatasetError, match="--resize"):
        DataArguments(resize=[0, 3])
    with pytest.raises(DatasetError, match="--max_train_samples must be positive"):
        DataArguments(max_train_samples=0)
    assert DataArguments(resize=[64]).resize == [64, 64]
