"""Finding an image-classification dataset: resolve a name or path, load it, find its columns.

``load_image_dataset`` accepts a Hub repo id (or an alias: ``cifar10``), a local folder in Hub
layout, an ImageFolder tree of photos, or parquet files; it finds the ``Image`` and ``ClassLabel``
columns (``find_image_columns``), class-encodes a ``label`` column of class names (an ImageFolder's
``metadata.jsonl``) as ``datasets`` does, and raises ``DatasetError`` (one line naming dataset and
column) for anything a classifier cannot be trained on: no images, no labels, a row without one. Local paths never leave this module: ``public_name``
is what cards and results show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from huggingface_hub import constants

from sep_hf.publish.hub import dataset_commit_sha

DATASET_ALIASES = {
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
}


class DatasetError(ValueError):
    """A dataset cannot be used for image classification; the message names dataset and column."""


# What a user with a folder of photos needs to know to label it (datasets' ImageFolder conventions).
IMAGEFOLDER_LAYOUT = ("datasets reads the labels of an image folder from class folders (train/<class name>/<image>, "
                      "test/<class name>/<image>) or from the class names in the 'label' field of a metadata.jsonl "
                      "beside the images (one JSON line per image: file_name, label)")


@dataclass(frozen=True)
class ImageColumns:
    """The image and label columns of a dataset and its class names (ClassLabel order)."""

    image: str
    label: str
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class ImageDataset:
    """A loaded dataset plus what the rest of the product needs to know about it."""

    name: str  # what the user asked for, e.g. "cifar10"
    dataset_id: str  # Hub repo id or absolute local path
    revision: str | None  # Hub commit sha the data was read at (None for local paths)
    splits: datasets.DatasetDict  # noqa: F821
    columns: ImageColumns
    class_encoded: str | None = None  # the column of class names (strings) read as a ClassLabel here, if any

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.dataset_id)

    def split(self, name: str):
        if name not in self.splits:
            raise DatasetError(
                f"Dataset '{self.name}' has no split '{name}' (splits: {', '.join(self.splits)})."
            )
        return self.splits[name]


def resolve_dataset_name(name: str) -> str:
    """Map a short alias to its Hub id; a local path becomes absolute; anything else is a Hub id."""
    if name in DATASET_ALIASES:
        return DATASET_ALIASES[name]
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".parquet"):
        raise DatasetError(f"Dataset path '{name}' does not exist.")
    return name


def public_name(dataset_id: str) -> str:
    """What a card or log may show: a Hub id as is, a local path as its folder name only."""
    return Path(dataset_id).name if os.path.isabs(dataset_id) else dataset_id


def _load_raw(dataset_id: str, revision: str | None):

    path = Path(dataset_id)
    try:
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files={"train": str(path)})
        if path.is_dir():
            # Hub-layout folders (README configs, data/*.parquet) and ImageFolder trees are both
            # recognised by datasets' own module inference. The resolved files are passed back in
            # because datasets keys a folder's cache on its README alone: two folders (or one
            # rewritten) with the same card would load the first one's cached rows.
            inferred = datasets.load_dataset_builder(str(path))
            return datasets.load_dataset(str(path), data_files=inferred.config.data_files,
                                         features=inferred.info.features)
        return datasets.load_dataset(dataset_id, revision=revision)
    except ValueError as err:
        if "corresponds to no data" in str(err):  # datasets' wording for an empty split
            raise DatasetError(f"Dataset '{dataset_id}' has a split with zero rows ({err}).") from err
        raise
    except datasets.data_files.EmptyDatasetError as err:  # an empty folder, or one with no image or data files
        raise DatasetError(f"Dataset '{dataset_id}' holds no images: {IMAGEFOLDER_LAYOUT}.") from err
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DatasetError(
            f"Dataset '{dataset_id}' was not found on the Hub at {constants.ENDPOINT} "
            f"(nor as a local path). Check the id, your token, or set HF_ENDPOINT."
        ) from err


def _as_dataset_dict(raw):

    if isinstance(raw, datasets.DatasetDict):
        return raw
    return datasets.DatasetDict({"train": raw})


def find_image_columns(
    features, dataset_name: str = "dataset", image_column: str | None = None, label_column: str | None = None,
    no_label_help: str = "Cast integer labels with dataset.class_encode_column(...) first.",
) -> ImageColumns:
    """Find the ``Image`` and ``ClassLabel`` columns from the features (or check the overrides).

    ``no_label_help``: what the error for a dataset without a ClassLabel column tells the user to do.
    """

    def check(column: str, kind, what: str, flag: str) -> str:
        if column not in features:
            raise DatasetError(
                f"Dataset '{dataset_name}' has no column '{column}' (columns: {', '.join(features)}); "
                f"fix {flag}."
            )
        if not isinstance(features[column], kind):
            raise DatasetError(
                f"Column '{column}' of dataset '{dataset_name}' is {features[column]!r}, not {what}; "
                f"pass {flag} naming an {what} column."
            )
        return column

    def pick(kind, what: str, flag: str) -> str:
        found = [name for name, feature in features.items() if isinstance(feature, kind)]
        if not found:
            raise DatasetError(
                f"Dataset '{dataset_name}' has no {what} column (columns: "
                f"{', '.join(f'{n}: {type(f).__name__}' for n, f in features.items())}). "
                + (
                    no_label_help
                    if kind is datasets.ClassLabel
                    else f"Pass {flag} if the images are stored in another column."
                )
            )
        if len(found) > 1:
            raise DatasetError(
                f"Dataset '{dataset_name}' has several {what} columns ({', '.join(found)}); "
                f"choose one with {flag}."
            )
        return found[0]

    image = (
        check(image_column, datasets.Image, "Image", "--image_column")
        if image_column
        else pick(datasets.Image, "Image", "--image_column")
    )
    label = (
        check(label_column, datasets.ClassLabel, "ClassLabel", "--label_column")
        if label_column
        else pick(datasets.ClassLabel, "ClassLabel", "--label_column")
    )
    return ImageColumns(image=image, label=label, class_names=tuple(features[label].names))


def class_encode_names(splits, label_column: str | None = None):
    """(splits, the encoded column or None): a column of class names (strings: the ``label`` of an
    ImageFolder's metadata.jsonl, or ``--label_column``) as one ClassLabel of every split.

    The names are sorted, as ``datasets``' ``class_encode_column`` orders them, but over every split
    together (``DatasetDict.class_encode_column`` encodes each split alone: a class missing from one
    split would shift the others' indices). A dataset that has a ClassLabel column keeps it.
    """
    features = next(iter(splits.values())).features
    column = label_column or "label"
    feature = features.get(column)
    has_class_label = any(isinstance(other, datasets.ClassLabel) for other in features.values())
    is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not is_text or (has_class_label and label_column is None):
        return splits, None
    names = sorted({value for split in splits.values() for value in split.unique(column) if value is not None})
    class_label = datasets.ClassLabel(names=names)
    return datasets.DatasetDict({name: split.cast_column(column, class_label) for name, split in splits.items()}), column


def check_every_row_labelled(split, split_name: str, dataset_name: str, label_column: str) -> None:
    """Raise ``DatasetError`` for rows whose label is missing (None), before anything decodes them.

    Every row unlabelled is a layout datasets could not read labels from (train/*.png, test/*.png: the
    split folders taken for classes); some rows unlabelled are named by their first row.
    """
    missing = split.data.column(label_column).is_null().to_numpy(zero_copy_only=False)
    if missing.all():
        raise DatasetError(f"Split '{split_name}' of dataset '{dataset_name}' has no class labels (column "
                           f"'{label_column}' is empty): {IMAGEFOLDER_LAYOUT}.")
    if missing.any():
        rows = np.flatnonzero(missing)
        raise DatasetError(f"{len(rows)} row(s) of split '{split_name}' of dataset '{dataset_name}' have no label (row "
                           f"{int(rows[0])} first) in column '{label_column}': label them or drop them.")


def load_image_dataset(
    name: str,
    revision: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> ImageDataset:
    """Open a Hub image-classification dataset by id, alias (``cifar10``) or local path.

    Raises ``DatasetError`` naming the dataset and column when the dataset has no ``Image`` or no
    ``ClassLabel`` column, or a split with zero rows.
    """
    dataset_id = resolve_dataset_name(name)
    splits = _as_dataset_dict(_load_raw(dataset_id, revision))
    if not splits:
        raise DatasetError(f"Dataset '{name}' has no splits.")
    splits, class_encoded = class_encode_names(splits, label_column)
    features = next(iter(splits.values())).features
    no_label_help = (f"Its images have no class labels: {IMAGEFOLDER_LAYOUT}." if Path(dataset_id).is_dir()
                     else "Cast integer labels with dataset.class_encode_column(...) first.")
    columns = find_image_columns(features, name, image_column, label_column, no_label_help)
    for split_name, split in splits.items():
        if split.num_rows == 0:
            raise DatasetError(
                f"Split '{split_name}' of dataset '{name}' has zero rows in column '{columns.image}'."
            )
        check_every_row_labelled(split, split_name, name, columns.label)
    sha = None
    if not os.path.isabs(dataset_id):

        sha = dataset_commit_sha(dataset_id, revision)
    return ImageDataset(name=name, dataset_id=dataset_id, revision=sha, splits=splits, columns=columns,
                        class_encoded=class_encoded)
