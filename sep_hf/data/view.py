"""The models' view of a dataset: what source training, crafting and victims read.

``scan_split`` decodes every published image once (size, mode and label only), so bad images,
bad labels and mixed sizes without ``--image_size`` fail before any compute. ``model_view`` gives
the colour channels resized to the models' input size: a uint8 tensor (N, C, H, W) up to
``--keep_in_memory_mb``, otherwise ``ImageRows``, which decodes rows on demand from the
memory-mapped Arrow table, so memory does not grow with N. ``load_training_data`` puts together
the training split and the evaluation split (test | validation | a held-out part of train).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from sep_hf.data.images import (
    DECODE_BATCH,
    convert_mode,
    decode_batch,
    decode_image,
    image_mode,
    images_to_uint8,
    split_where,
    undecoded,
    union_mode,
)
from sep_hf.data.load import DatasetError, ImageColumns, ImageDataset, load_image_dataset, resolve_dataset_name
from sep_hf.utils.flags import whole_number
from sep_hf.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "split_to_tensors",
    "SplitScan",
    "scan_split",
    "ImageRows",
    "DataArguments",
    "evaluation_split",
    "held_out_rows",
    "model_size",
    "model_view",
    "colour_mode",
    "first_rows",
    "source_splits",
    "TrainingData",
    "load_training_data",
]


# ----------------------------------------------------------------------------------------------
# images <-> tensors


@dataclass
class SplitScan:
    """What one pass over a split learned before any compute: each row's (height, width), the split's
    mode (``union_mode`` of its images) and its labels."""

    sizes: np.ndarray  # (N, 2) int: height, width
    mode: str
    labels: np.ndarray  # (N,) int64

    @property
    def uniform_size(self) -> tuple[int, int] | None:
        if len(self.sizes) and (self.sizes == self.sizes[0]).all():
            return int(self.sizes[0, 0]), int(self.sizes[0, 1])
        return None


def scan_split(split, columns: ImageColumns, max_samples: int | None = None, resize: Sequence[int] | None = None,
               desc: str | None = None) -> SplitScan:
    """Decode every image of (the first ``max_samples`` rows of) a split once, keeping only its size and mode,
    and check every label. Memory: one batch of images.

    Raises ``DatasetError`` naming the split and row for an image that does not decode (truncated,
    a decompression bomb, not an image, an ambiguous 16-bit or float image) and for a label outside
    the ClassLabel's range (``-1``, unlabeled, is allowed here; a protection refuses it later).
    """

    num_rows = split.num_rows if max_samples is None else min(max_samples, split.num_rows)
    where = split_where(split)
    split = undecoded(split, columns)
    sizes, modes, labels = np.zeros((num_rows, 2), dtype=np.int64), set(), []
    for start in tqdm(range(0, num_rows, DECODE_BATCH), desc=desc or "Checking images", unit="batch",
                      disable=desc is None):
        batch = split[start : min(start + DECODE_BATCH, num_rows)]
        for position, value in enumerate(batch[columns.image]):
            pil = decode_image(value, None, columns.image, where, start + position)
            sizes[start + position] = (resize[0], resize[1]) if resize is not None else (pil.size[1], pil.size[0])
            modes.add(pil.mode)
        labels.extend(batch[columns.label])
    labels = np.asarray(labels, dtype=np.int64)
    bad = np.nonzero((labels >= columns.num_classes) | (labels < -1))[0]
    if len(bad):
        raise DatasetError(f"Row {int(bad[0])}{where} has label {int(labels[bad[0]])}, outside the {columns.num_classes} "
                           f"classes of column '{columns.label}' ({len(bad)} such rows); fix or drop those rows.")
    return SplitScan(sizes, union_mode(modes) if modes else "RGB", labels)


def split_to_tensors(
    split,
    columns: ImageColumns,
    max_samples: int | None = None,
    resize: Sequence[int] | None = None,
    desc: str | None = None,
    size: Sequence[int] | None = None,
    mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (the first ``max_samples`` rows of) a split into uint8 images and int64 labels.

    The images come in the split's own mode (``images_to_uint8(mode=None)``): (N, 1, H, W) for a
    grayscale split, (N, 4, H, W) for RGBA, ...; a split mixing modes gets the smallest that holds them all.
    ``size=(H, W)`` with ``mode``: the model's view instead (``decode_batch``): colour channels of
    ``mode`` at that size, whatever each image's own size.
    """

    num_rows = split.num_rows if max_samples is None else min(max_samples, split.num_rows)
    if num_rows == 0:
        raise DatasetError(f"No rows to read from column '{columns.image}' (max_samples={max_samples}).")
    where = split_where(split)
    split = undecoded(split, columns)  # decode here, so an undecodable image is reported with its row
    images, labels = [], []
    for start in tqdm(range(0, num_rows, DECODE_BATCH), desc=desc or "Decoding images", unit="batch",
                      disable=desc is None):
        batch = split[start : min(start + DECODE_BATCH, num_rows)]
        if size is not None:
            images.append(decode_batch(batch[columns.image], mode, size, resize, columns.image, where, start))
        else:
            images.append(images_to_uint8(batch[columns.image], resize=resize, column=columns.image, where=where,
                                          first_row=start, mode=None))
        labels.append(torch.as_tensor(batch[columns.label], dtype=torch.int64))
    sizes = sorted({tuple(chunk.shape[2:]) for chunk in images})
    if len(sizes) > 1:
        raise DatasetError(
            f"Images in column '{columns.image}'{where} have different sizes ({sizes[0][0]}x{sizes[0][1]} "
            f"and {sizes[1][0]}x{sizes[1][1]}); pass --image_size S (models see S x S, images keep their size) "
            "or --resize H W (every image published at H x W)."
        )
    mode = union_mode(image_mode(chunk) for chunk in images)
    return torch.cat([convert_mode(chunk, mode) for chunk in images]), torch.cat(labels)


class ImageRows:
    """A split's images in the model's view (``decode_batch``), decoded on demand from the Arrow table.

    Stands in for a uint8 tensor (N, C, H, W) where the decoded split does not fit the memory budget:
    ``len``, ``shape``, ``dtype`` and indexing by int, slice (with step) or an index tensor, which
    decodes just those rows. Memory: the rows asked for; the table itself is memory-mapped.
    """

    dtype = torch.uint8

    def __init__(self, split, columns: ImageColumns, mode: str, size: Sequence[int], resize=None):
        self.where = split_where(split)
        self.source, self.columns = split, columns
        self.split = undecoded(split, columns).select_columns([columns.image])
        self.column, self.mode, self.size, self.resize = columns.image, mode, tuple(size), resize
        self.num_rows = split.num_rows
        channels = 1 if mode.startswith("L") else 3
        self.shape = torch.Size((self.num_rows, channels, *self.size))
        self.device = torch.device("cpu")
        self.fingerprint = f"{split._fingerprint}-{self.num_rows}-{mode}-{self.size}-{resize}"

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            rows = list(range(*key.indices(self.num_rows)))
        elif isinstance(key, int):
            return self[[key]][0]
        else:
            rows = torch.as_tensor(key).reshape(-1).tolist()
        if not rows:
            return torch.empty(0, *self.shape[1:], dtype=torch.uint8)
        values = self.split[rows][self.column]
        return decode_batch(values, self.mode, self.size, self.resize, self.column, self.where, rows)

    def to(self, *args, **kwargs):  # the rows are decoded on the host; each batch is moved by its user
        return self


# ----------------------------------------------------------------------------------------------
# the models' view: which rows, which size, in memory or on demand


@dataclass
class DataArguments:
    """Which dataset, which columns, how many rows. ``None`` sample caps are filled by presets."""

    # cpu: the first 10k training and 2k evaluation images; paper: every image (None stays None).
    PRESETS: ClassVar[dict] = {"paper": {}, "cpu": {"max_train_samples": 10_000, "max_eval_samples": 2_000}}

    dataset: str = field(default="cifar10", metadata={"help": "Hub dataset id, alias (cifar10, cifar100) or local path (Hub-layout folder, parquet file, ImageFolder tree)."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: the Image feature)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: the ClassLabel feature)."})
    image_size: list[int] | None = field(default=None, metadata={"help": "Model input size S (or H W): models see every image resized to it (antialiased bilinear); images are protected and published at their own size. Default: the images' size when they all share one."})
    resize: list[int] | None = field(default=None, metadata={"help": "Publish every image resized to H W (bicubic) instead of at its own size."})
    train_split: str = field(default="train", metadata={"help": "Split to train on / protect."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Clean dataset to evaluate on (default: --dataset)."})
    eval_split: str | None = field(default=None, metadata={"help": "Clean split to evaluate on (default: 'test', else 'validation', else --validation_split_percentage of the training split, held out)."})
    validation_split_percentage: float = field(default=10.0, metadata={"help": "Percent of the training split held out for evaluation when the dataset has no test or validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    keep_in_memory_mb: float = field(default=4096, metadata={"help": "Decoded model-size images up to this many MiB are held in memory (fastest); larger data are decoded batch by batch from the dataset."})

    def __post_init__(self):
        for name in ("resize", "image_size"):
            value = getattr(self, name)
            if value is not None and len(value) == 1:
                value = [value[0], value[0]]
                setattr(self, name, value)
            if value is not None and (len(value) != 2 or min(value) <= 0):
                raise DatasetError(f"--{name} takes S or H W (positive), got {value}.")
        for name in ("max_train_samples", "max_eval_samples"):  # 2.5 or true from a JSON/YAML file too
            if getattr(self, name) is not None:
                whole_number(getattr(self, name), f"--{name}")
        if not 0 < self.validation_split_percentage < 100:
            raise DatasetError(f"--validation_split_percentage must be in (0, 100), got {self.validation_split_percentage}.")

    def load(self) -> ImageDataset:
        return load_image_dataset(self.dataset, self.dataset_revision, self.image_column, self.label_column)


EVAL_SPLITS = ("test", "validation")


def evaluation_split(dataset: ImageDataset, args: DataArguments) -> str | None:
    """The split the source and victims are evaluated on: --eval_split, else test, else validation;
    None: hold out part of the training split (``held_out_rows``)."""
    if args.eval_split is not None:
        if args.eval_split not in dataset.splits:
            raise DatasetError(f"Dataset '{dataset.name}' has no split '{args.eval_split}' (splits: "
                               f"{', '.join(dataset.splits)}); drop --eval_split to hold out "
                               f"{args.validation_split_percentage:g}% of '{args.train_split}' instead.")
        return args.eval_split
    return next((name for name in EVAL_SPLITS if name in dataset.splits and name != args.train_split), None)


def held_out_rows(num_rows: int, args: DataArguments, seed: int = 0) -> tuple[list[int], list[int], str]:
    """(training rows, held-out rows, the evaluation split's name) of a training split without a test or
    validation split: a seeded --validation_split_percentage held out (at most --max_eval_samples of
    them evaluated), both sorted; as ``Dataset.train_test_split`` in the transformers image-classification example."""
    percentage = args.validation_split_percentage
    count = max(1, round(num_rows * percentage / 100))
    if count >= num_rows:
        raise DatasetError(f"{num_rows} training rows are too few to hold out {percentage:g}% for evaluation; "
                           "pass --eval_split or --eval_dataset.")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    held_out = sorted(order[:count].tolist())[: args.max_eval_samples]
    return sorted(order[count:].tolist()), held_out, f"{args.train_split} ({percentage:g}% held out)"


def model_size(scans: Iterable[SplitScan], args: DataArguments, native: bool = False) -> tuple[int, int]:
    """The models' input size: --image_size, else the one size every scanned image has (DatasetError if mixed).

    ``native``: the images' own size first when they share one (a model that resizes them itself: timm's
    transforms of a pretrained victim), --image_size only for a folder of mixed sizes.
    """
    scans = list(scans)
    sizes = {scan.uniform_size for scan in scans}
    if args.image_size is not None and not (native and len(sizes) == 1 and None not in sizes):
        return tuple(args.image_size)
    if len(sizes) == 1 and None not in sizes:
        return next(iter(sizes))
    seen = np.concatenate([scan.sizes for scan in scans])
    raise DatasetError(f"Images of dataset '{args.dataset}' have different sizes ({int(seen[:, 0].min())} to "
                       f"{int(seen[:, 0].max())} px high, {int(seen[:, 1].min())} to {int(seen[:, 1].max())} px wide); "
                       "pass --image_size S: models see S x S and every image is protected and published at its own size "
                       "(or --resize H W to publish them all at H x W).")


def model_view(split, columns: ImageColumns, mode: str, size: Sequence[int], resize=None,
               budget_mb: float = float("inf"), desc: str | None = None) -> torch.Tensor | ImageRows:
    """A split's images as the models see them (colour channels of ``mode`` at ``size``): a uint8 tensor
    (N, C, H, W) when it fits ``budget_mb`` MiB, else ``ImageRows`` decoding rows on demand."""
    channels = 1 if mode.startswith("L") else 3
    if split.num_rows * channels * size[0] * size[1] / 2**20 > budget_mb:
        logger.info("%d images at %dx%d exceed --keep_in_memory_mb %g: decoding them batch by batch",
                    split.num_rows, size[0], size[1], budget_mb)
        return ImageRows(split, columns, mode, size, resize)
    return split_to_tensors(split, columns, resize=resize, desc=desc, size=size, mode=mode)[0]


def colour_mode(mode: str) -> str:
    """The colour part of a mode, what models see: LA -> L, RGBA -> RGB."""
    return mode[:-1] if mode.endswith("A") else mode


@dataclass
class TrainingData:
    """Model-size data: uint8 images (N, C, H, W) (a tensor, or ``ImageRows`` over the dataset) and
    int64 labels, plus provenance.

    What a model sees: the colour channels of the split (C = 1 for a grayscale dataset, 3 for colour;
    an alpha channel is dropped) at the models' input size, the evaluation images in the training images' mode.
    """

    train_images: torch.Tensor | ImageRows
    train_labels: torch.Tensor
    eval_images: torch.Tensor | ImageRows
    eval_labels: torch.Tensor
    class_names: tuple[str, ...]
    dataset_id: str
    dataset_revision: str | None
    eval_dataset_id: str | None = None  # None: the same dataset as training
    eval_dataset_revision: str | None = None
    eval_split: str | None = None  # what was evaluated on, e.g. "test" or "train (10% held out)"


def first_rows(split, limit: int | None):
    """The first ``limit`` rows of a split (all when None)."""
    return split.select(range(min(limit, split.num_rows))) if limit and limit < split.num_rows else split


def source_splits(dataset: ImageDataset, eval_dataset: ImageDataset, args: DataArguments):
    """(training rows, evaluation rows, evaluation split's name) for the source or a victim.

    Without a test or validation split, a seeded --validation_split_percentage of the training rows
    is held out: evaluated on, not trained on.
    """
    train = first_rows(dataset.split(args.train_split), args.max_train_samples)
    eval_name = evaluation_split(eval_dataset, args)
    if eval_name is None:
        if eval_dataset is not dataset:
            raise DatasetError(f"Evaluation dataset '{args.eval_dataset}' has no test or validation split "
                               f"(splits: {', '.join(eval_dataset.splits)}); pass --eval_split.")
        rows, held_out, name = held_out_rows(train.num_rows, args)
        return train.select(rows), train.select(held_out), name
    return train, first_rows(eval_dataset.split(eval_name), args.max_eval_samples), eval_name


def load_training_data(args: DataArguments, dataset: ImageDataset | None = None, native_size: bool = False) -> TrainingData:
    """The training split (of ``--dataset``) and evaluation split (of ``--eval_dataset``) in the models' view
    (``native_size``: at the images' own size when they share one, see ``model_size``).

    Every image is decoded once first (``scan_split``: bad images and labels raise ``DatasetError``
    here, before any compute), then decoded at the model size into tensors, or left on disk as
    ``ImageRows`` when larger than ``--keep_in_memory_mb``.
    """
    dataset = dataset or args.load()
    eval_dataset = dataset
    if args.eval_dataset and resolve_dataset_name(args.eval_dataset) != dataset.dataset_id:
        eval_dataset = load_image_dataset(args.eval_dataset, None, args.image_column, args.label_column)
        ours, theirs = dataset.columns.class_names, eval_dataset.columns.class_names
        if ours != theirs:
            differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            first = (f"class {differ} is '{ours[differ] if differ < len(ours) else '(none)'}' in '{args.dataset}' and "
                     f"'{theirs[differ] if differ < len(theirs) else '(none)'}' in '{args.eval_dataset}'")
            raise DatasetError(
                f"Evaluation dataset '{args.eval_dataset}' has {len(theirs)} classes and '{args.dataset}' has "
                f"{len(ours)}; {first}: they must share one ClassLabel."
            )
    train, evaluation, eval_name = source_splits(dataset, eval_dataset, args)
    train_scan = scan_split(train, dataset.columns, resize=args.resize, desc="Checking training images")
    eval_scan = scan_split(evaluation, eval_dataset.columns, resize=args.resize, desc="Checking evaluation images")
    mode = colour_mode(train_scan.mode)
    size = model_size([train_scan, eval_scan], args, native=native_size)
    train_images = model_view(train, dataset.columns, mode, size, args.resize, args.keep_in_memory_mb,
                              "Decoding training images")
    eval_images = model_view(evaluation, eval_dataset.columns, mode, size, args.resize, args.keep_in_memory_mb,
                             "Decoding evaluation images")
    return TrainingData(train_images, torch.from_numpy(train_scan.labels), eval_images,
                        torch.from_numpy(eval_scan.labels), dataset.columns.class_names, dataset.dataset_id,
                        dataset.revision, eval_dataset.dataset_id, eval_dataset.revision, eval_name)


# ----------------------------------------------------------------------------------------------
# writing a Hub-layout dataset folder


