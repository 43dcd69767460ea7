"""Finding an image-classification dataset: resolve a name or path, load it, find its columns.

``load_image_dataset`` accepts a Hub repo id (or an alias: ``cifar10``), a local folder in Hub
layout, an ImageFolder tree of photos, or parquet files; it finds the ``Image`` and ``ClassLabel``
columns (``find_image_columns``) and raises ``DatasetError`` (one line naming dataset and column)
for anything a classifier cannot be trained on. Local paths never leave this module: ``public_name``
is what cards and results show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import datasets
from huggingface_hub import constants

from sep_hf.publish.hub import dataset_commit_sha

DATASET_ALIASES = {
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
}


class DatasetError(ValueError):
    """A dataset cannot be used for image classification; the message names dataset and column."""


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
    features, dataset_name: str = "dataset", image_column: str | None = None, label_column: str | None = None
) -> ImageColumns:
    """Find the ``Image`` and ``ClassLabel`` columns from the features (or check the overrides)."""

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
                    "Cast integer labels with dataset.class_encode_column(...) first."
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
    features = next(iter(splits.values())).features
    columns = find_image_columns(features, name, image_column, label_column)
    for split_name, split in splits.items():
        if split.num_rows == 0:
            raise DatasetError(
                f"Split '{split_name}' of dataset '{name}' has zero rows in column '{columns.image}'."
            )
    sha = None
    if not os.path.isabs(dataset_id):

        sha = dataset_commit_sha(dataset_id, revision)
    return ImageDataset(name=name, dataset_id=dataset_id, revision=sha, splits=splits, columns=columns)
