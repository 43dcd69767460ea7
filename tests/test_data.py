"""Data layer: dataset resolution, column detection, clear errors, lossless image <-> tensor."""
from __future__ import annotations

import io

import datasets
import numpy as np
import pyarrow.parquet as pq
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
    served = sum(pq.ParquetFile(path).metadata.num_rows for path in (CIFAR10_DIR / "data").glob("test-*.parquet"))
    assert dataset.split("test").num_rows == served  # 10,000 from ../shared, the stand-in's without it


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
    for bad in (0, -1, 2.5, True):  # a JSON / YAML argument file can hold any of these
        with pytest.raises(ValueError, match="--max_train_samples must be a positive whole number"):
            DataArguments(max_train_samples=bad)
    with pytest.raises(ValueError, match="--max_eval_samples must be a positive whole number"):
        DataArguments(max_eval_samples=0.5)
    assert DataArguments(resize=[64]).resize == [64, 64]


# ----------------------------------------------------------------------------------------------
# folders a user points --dataset at: empty, unlabelled, labelled by metadata.jsonl (issue 34)


def _write_pngs(folder, count, seed=0):
    """``count`` 8x8 PNGs named 000.png, 001.png, ... in ``folder``; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{index:03d}.png" for index in range(count)]
    for name, pixels in zip(names, _images(count, seed=seed)):
        Image.fromarray(pixels).save(folder / name)
    return names


def _write_metadata(folder, rows):
    import json

    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_empty_folders_are_one_line_naming_the_layout(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "empty-classes" / "train" / "cat").mkdir(parents=True)  # class folders without images
    (tmp_path / "card-only").mkdir()
    (tmp_path / "card-only" / "README.md").write_text("# my photos\n")
    for folder in ("empty", "empty-classes", "card-only"):
        with pytest.raises(DatasetError, match=rf"'{tmp_path / folder}' holds no images.*train/<class name>/"):
            load_image_dataset(str(tmp_path / folder))


def test_images_without_class_folders_say_how_to_label_them(tmp_path):
    split_folders = tmp_path / "split-folders"  # train/*.png and test/*.png: datasets takes train, test as classes
    _write_pngs(split_folders / "train", 6)
    _write_pngs(split_folders / "test", 4)
    flat = tmp_path / "flat"  # images directly in the folder
    _write_pngs(flat, 6)
    captions = tmp_path / "captions"  # metadata.jsonl without a label
    _write_metadata(captions / "train", [{"file_name": name, "caption": "a photo"} for name in _write_pngs(captions / "train", 4)])
    for folder in (split_folders, flat, captions):
        with pytest.raises(DatasetError, match=r"no class labels.*train/<class name>/.*metadata.jsonl"):
            load_image_dataset(str(folder))


def test_a_row_without_a_label_is_named(tmp_path):
    features = _features(img=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))
    rows = {"img": [Image.fromarray(p) for p in _images(4)], "label": [0, 1, None, 1]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(DatasetError, match=r"1 row.* no label \(row 2"):
        load_image_dataset(str(tmp_path / "train.parquet"))


def test_class_names_in_metadata_are_class_encoded_as_datasets_does(tmp_path):
    names = {"train": ["dog", "cat", "bird", "cat"], "test": ["cat", "zebra"]}  # zebra: a class only the test split has
    for split, labels in names.items():
        files = _write_pngs(tmp_path / split, len(labels))
        _write_metadata(tmp_path / split, [{"file_name": f, "label": label} for f, label in zip(files, labels)])
    dataset = load_image_dataset(str(tmp_path))
    assert dataset.columns.label == "label" and dataset.class_encoded == "label"
    assert dataset.columns.class_names == ("bird", "cat", "dog", "zebra")  # sorted over every split, one ClassLabel
    for split, labels in names.items():
        encoded = dataset.split(split)["label"]
        assert [dataset.columns.class_names[index] for index in encoded] == labels
    _write_pngs(tmp_path / "tree" / "train" / "cat", 2)
    _write_pngs(tmp_path / "tree" / "train" / "dog", 2)
    assert load_image_dataset(str(tmp_path / "tree")).class_encoded is None  # class folders: a ClassLabel as it is
