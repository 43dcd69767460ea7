"""Image-classification datasets: resolve, validate, and convert between images and tensors.

This is the only module that knows about image columns and PIL. Everything downstream works on
``uint8`` / ``float`` tensors of shape (N, C, H, W); floats are pixels in [0, 1].

A split is decoded in its own mode (``split_to_tensors``): C = 1 (``L``), 2 (``LA``), 3 (``RGB``)
or 4 (``RGBA``), so a grayscale dataset stays grayscale and an alpha channel is kept. Models see
the colour channels only (``split_alpha``): alpha is split off before training or crafting and
written back, untouched, into the published PNGs.

Perturbed pixels leave this module as PNG bytes quantized **by rounding** (never JPEG, never
truncation), so a budget that holds on the float tensor still holds on the published image.

Every image is decoded as ``load_dataset`` shows it (``decode_image``: the ``datasets`` decoder,
EXIF orientation applied, 16-bit and float images scaled to 8 bits) at its own resolution. Models
see a separate *view* (``decode_batch(size=...)``, ``model_view``): the colour channels resized to
the models' input size; it is held in memory up to ``--keep_in_memory_mb`` and otherwise decoded
batch by batch from the memory-mapped Arrow table (``ImageRows``), so memory does not grow with N.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_ALIASES",
    "DatasetError",
    "ImageColumns",
    "ImageDataset",
    "resolve_dataset_name",
    "public_name",
    "load_image_dataset",
    "find_image_columns",
    "images_to_uint8",
    "MODE_CHANNELS",
    "image_mode",
    "union_mode",
    "split_alpha",
    "convert_mode",
    "uint8_to_float",
    "quantize",
    "encode_png",
    "tensor_to_png_images",
    "split_to_tensors",
    "decode_image",
    "decode_batch",
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
    "embed_image_bytes",
    "undecoded",
    "write_hub_layout",
]

DATASET_ALIASES = {
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
}

_DECODE_BATCH = 1000


class DatasetError(ValueError):
    """A dataset cannot be used for image classification; the message names dataset and column."""


@dataclass(frozen=True)
class ImageColumns:
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
    splits: "datasets.DatasetDict"  # noqa: F821
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
    import datasets

    path = Path(dataset_id)
    try:
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files={"train": str(path)})
        if path.is_dir():
            # Hub-layout folders (README configs, data/*.parquet) and ImageFolder trees are both
            # recognised by datasets' own module inference.
            return datasets.load_dataset(str(path))
        return datasets.load_dataset(dataset_id, revision=revision)
    except ValueError as err:
        if "corresponds to no data" in str(err):  # datasets' wording for an empty split
            raise DatasetError(f"Dataset '{dataset_id}' has a split with zero rows ({err}).") from err
        raise
    except datasets.exceptions.DatasetNotFoundError as err:
        from huggingface_hub import constants

        raise DatasetError(
            f"Dataset '{dataset_id}' was not found on the Hub at {constants.ENDPOINT} "
            f"(nor as a local path). Check the id, your token, or set HF_ENDPOINT."
        ) from err


def _as_dataset_dict(raw):
    import datasets

    if isinstance(raw, datasets.DatasetDict):
        return raw
    return datasets.DatasetDict({"train": raw})


def find_image_columns(
    features, dataset_name: str = "dataset", image_column: str | None = None, label_column: str | None = None
) -> ImageColumns:
    """Find the ``Image`` and ``ClassLabel`` columns from the features (or check the overrides)."""
    import datasets

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
        from sep_hf.hub import dataset_commit_sha

        sha = dataset_commit_sha(dataset_id, revision)
    return ImageDataset(name=name, dataset_id=dataset_id, revision=sha, splits=splits, columns=columns)


# ----------------------------------------------------------------------------------------------
# images <-> tensors


def _to_pil(image) -> PILImage.Image:
    """An image as ``load_dataset`` shows it: Image-feature dicts and paths are decoded by ``datasets``
    itself (EXIF orientation applied, hf:// paths read), PIL images and HWC arrays are taken as they are."""
    if isinstance(image, PILImage.Image):
        return image
    if isinstance(image, (dict, str)):  # undecoded Image feature: {"bytes": ..., "path": ...} or a path
        import datasets

        return datasets.Image().decode_example(image)
    if isinstance(image, np.ndarray):
        return PILImage.fromarray(image)
    raise DatasetError(f"Cannot read an image from a {type(image).__name__}.")


def _to_8bit(image: PILImage.Image) -> PILImage.Image:
    """Deep grey images scaled to 8 bits, so a 16-bit or float image is never published white or black.

    ``I;16*`` (16-bit PNG / TIFF): level = round(v / 257). ``I`` (32-bit integer, how some decoders
    return 16-bit files): the same when every value is in [0, 65535]. ``F`` (float): level =
    round(255 v) when every value is in [0, 1]. Anything else is ambiguous and raises ``ValueError``.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if low < 0 or high > 1:
            raise ValueError(f"a float (mode F) image with values in [{low:g}, {high:g}]: only [0, 1] has one meaning; "
                             "convert it to 8-bit (L or RGB) first")
        scaled = values * 255.0
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"a {image.mode} image with values in [{low:g}, {high:g}], outside 16 bits; "
                             "convert it to 8-bit (L or RGB) first")
        scaled = values / 257.0
    return PILImage.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8), mode="L")


MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_CHANNEL_MODES = {channels: mode for mode, channels in MODE_CHANNELS.items()}
# PIL modes that are one grey channel (bilevel, 32-bit integer, 16-bit, float) and their alpha forms
_GREY_MODES = {"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"LA": "LA", "La": "LA", "RGBA": "RGBA", "RGBa": "RGBA", "PA": "RGBA"}


def image_mode(images_or_channels) -> str:
    """The mode (L, LA, RGB, RGBA) of a uint8 (N, C, H, W) tensor, or of a channel count."""
    channels = images_or_channels if isinstance(images_or_channels, int) else images_or_channels.shape[1]
    if channels not in _CHANNEL_MODES:
        raise ValueError(f"Images have {channels} channels; supported: 1 (L), 2 (LA), 3 (RGB), 4 (RGBA).")
    return _CHANNEL_MODES[channels]


def union_mode(modes: Iterable[str]) -> str:
    """The smallest mode that holds every one of ``modes`` exactly: colour if any is, alpha if any has it."""
    modes = list(modes)
    colour = any(mode.startswith("RGB") for mode in modes)
    alpha = any(mode.endswith("A") for mode in modes)
    return ("RGB" if colour else "L") + ("A" if alpha else "")


def split_alpha(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(colour channels, alpha channel or None) of (N, C, H, W) images: LA -> L + A, RGBA -> RGB + A."""
    if images.shape[1] in (2, 4):
        return images[:, :-1].contiguous(), images[:, -1:].contiguous()
    return images, None


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 RGB -> L exactly as PIL's ``convert("L")`` (ITU-R 601-2 in 16-bit fixed point, rounded)."""
    r, g, b = rgb.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)


def convert_mode(images: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 (N, C, H, W) images in ``mode``, exactly as PIL converts them: L -> RGB repeats the grey
    level, RGB -> L is PIL's luma, a missing alpha is 255 (opaque) and an unwanted one is dropped."""
    if mode not in MODE_CHANNELS:
        raise ValueError(f"Unknown image mode '{mode}' (supported: {', '.join(MODE_CHANNELS)}).")
    if images.shape[1] == MODE_CHANNELS[mode]:
        return images
    colour, alpha = split_alpha(images)
    wanted = 3 if mode.startswith("RGB") else 1
    if colour.shape[1] != wanted:
        colour = colour.expand(-1, 3, -1, -1) if wanted == 3 else _luma(colour)
    if not mode.endswith("A"):
        return colour.contiguous()
    if alpha is None:
        alpha = torch.full_like(colour[:, :1], 255)
    return torch.cat([colour, alpha], 1)


def _own_mode(image: PILImage.Image) -> PILImage.Image:
    """The image in the nearest of L, LA, RGB, RGBA: grey stays grey, alpha (or palette transparency) is kept."""
    if image.mode in MODE_CHANNELS:
        return image
    if image.mode in _GREY_MODES:
        return image.convert("L")
    if image.mode in _ALPHA_MODES:
        return image.convert(_ALPHA_MODES[image.mode])
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")  # P, CMYK, YCbCr, RGBX, HSV


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white so transparent pixels do not turn black.
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(image, convert=None, column: str = "image", where: str = "", row: int = 0) -> PILImage.Image:
    """One image as ``load_dataset`` shows it, in 8 bits (``_to_8bit``), then ``convert``-ed (default: its
    own mode of L, LA, RGB, RGBA). Any failure (not an image, truncated, a decompression bomb, an
    ambiguous deep image) is a ``DatasetError`` naming the row, column and ``where`` (the split)."""
    try:
        pil = _to_pil(image)
        pil.load()  # a truncated file fails here, not later in numpy
        return (convert or _own_mode)(_to_8bit(pil))
    except PILImage.DecompressionBombError as err:
        raise DatasetError(f"The image in row {row} of column '{column}'{where} is too large to decode safely ({err}); "
                           "downscale or drop that row.") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "not an image"
        raise DatasetError(f"The image in row {row} of column '{column}'{where} cannot be decoded "
                           f"({type(err).__name__}: {err}); fix or drop that row.") from err


def images_to_uint8(
    images: Iterable, resize: Sequence[int] | None = None, column: str = "image", where: str = "", first_row: int = 0,
    mode: str | None = "RGB",
) -> torch.Tensor:
    """Decode images (PIL, Image-feature dicts or HWC arrays) to a uint8 tensor (N, C, H, W).

    ``mode="RGB"``: every image becomes RGB (C = 3): grey levels are repeated, palettes expanded and
    transparent pixels composited on white. ``mode=None``: every image keeps its own channels
    (grey -> L, grey + alpha -> LA, colour -> RGB, colour + alpha or palette transparency -> RGBA)
    and the batch is returned in the smallest mode that holds them all (``union_mode``; an L image
    in an RGB batch is repeated, a missing alpha is 255). Images of different sizes are an error
    unless ``resize=(H, W)`` is given, which resizes every image (bicubic) to that size. An image
    that does not decode is a ``DatasetError`` naming its row (``first_row`` + position) and ``where``.
    """
    if mode not in ("RGB", None):
        raise ValueError(f"images_to_uint8 decodes to mode 'RGB' or None (each image's own), not {mode!r}; "
                         "use convert_mode on the result for another mode.")
    convert = _to_rgb if mode == "RGB" else _own_mode
    arrays = []
    size = None
    for position, image in enumerate(images):
        pil = decode_image(image, convert, column, where, first_row + position)
        if resize is not None:
            height, width = resize
            if pil.size != (width, height):
                pil = pil.resize((width, height), PILImage.BICUBIC)
        elif size is None:
            size = pil.size
        elif pil.size != size:
            raise DatasetError(
                f"Images in column '{column}'{where} have different sizes ({size[1]}x{size[0]} and "
                f"{pil.size[1]}x{pil.size[0]}); pass --image_size S (models see S x S, images keep their size) "
                "or --resize H W (every image published at H x W)."
            )
        array = np.asarray(pil, dtype=np.uint8)
        arrays.append(array[..., None] if array.ndim == 2 else array)  # L: (H, W) -> (H, W, 1)
    if not arrays:
        return torch.empty(0, 3, *(resize or (0, 0)), dtype=torch.uint8)
    if mode is None and len({array.shape[2] for array in arrays}) > 1:
        target = union_mode(image_mode(array.shape[2]) for array in arrays)
        return torch.cat([convert_mode(torch.from_numpy(np.array(array)).permute(2, 0, 1).unsqueeze(0), target)
                          for array in arrays]).contiguous()
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] -> uint8 by rounding to the nearest level."""
    return images.detach().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def encode_png(image_chw: torch.Tensor) -> bytes:
    """A uint8 (C, H, W) image as PNG bytes in mode L, LA, RGB or RGBA (from C = 1, 2, 3, 4)."""
    image_mode(image_chw.shape[0])  # raises on an unsupported channel count
    array = image_chw.permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    PILImage.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def tensor_to_png_images(images: torch.Tensor, alpha: torch.Tensor | None = None) -> list[dict]:
    """Float [0, 1] or uint8 (N, C, H, W) -> Image-feature dicts holding lossless PNG bytes.

    ``alpha`` (uint8 (N, 1, H, W)) is appended as is: L + alpha is written as LA, RGB + alpha as RGBA.
    """
    if images.dtype != torch.uint8:
        images = quantize(images)
    if alpha is not None:
        if alpha.dtype != torch.uint8 or alpha.shape[1] != 1 or alpha.shape[0] != images.shape[0] \
                or alpha.shape[2:] != images.shape[2:]:
            raise ValueError(f"alpha must be uint8 (N, 1, H, W) matching images {tuple(images.shape)}; "
                             f"got {alpha.dtype} {tuple(alpha.shape)}.")
        images = torch.cat([images.cpu(), alpha.cpu()], 1)
    return [{"bytes": encode_png(image), "path": None} for image in images.cpu()]


def undecoded(split, columns: ImageColumns):
    """The split with its image column left encoded, so this module decodes (and names a bad row)."""
    import datasets

    if isinstance(split.features[columns.image], datasets.Image) and split.features[columns.image].decode:
        return split.cast_column(columns.image, datasets.Image(decode=False))
    return split


def _where(split) -> str:
    return f" of split '{split.split}'" if split.split is not None else ""


def decode_batch(values: Sequence, mode: str, size: Sequence[int] | None = None, resize: Sequence[int] | None = None,
                 column: str = "image", where: str = "", first_row: int | Sequence[int] = 0) -> list[torch.Tensor] | torch.Tensor:
    """Decode images (``decode_image``) into ``mode``'s channels, as uint8 tensors.

    ``size=(H, W)``: the model's view: alpha dropped, each image resized with ``resize_to_model`` and
    rounded, returned stacked (N, C, H, W). ``size=None``: a list of (C, H, W) tensors at native
    resolution (or at ``resize``, PIL bicubic, when the user asked to publish at one size).
    ``first_row``: the row of ``values[0]`` (errors name ``first_row + position``), or every value's row.
    """
    from sep_hf.models import resize_to_model

    out = []
    for position, value in enumerate(values):
        row = first_row + position if isinstance(first_row, int) else first_row[position]
        pil = decode_image(value, None, column, where, row)
        if resize is not None and pil.size != (resize[1], resize[0]):
            pil = pil.resize((resize[1], resize[0]), PILImage.BICUBIC)
        array = np.array(pil, dtype=np.uint8)  # a writable copy, as torch.from_numpy needs
        image = convert_mode(torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).unsqueeze(0), mode)
        if size is not None:
            image = split_alpha(image)[0]
            if tuple(image.shape[-2:]) != tuple(size):
                image = quantize(resize_to_model(uint8_to_float(image), size))
        out.append(image[0])
    return torch.stack(out) if size is not None and out else out


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
    from tqdm.auto import tqdm

    num_rows = split.num_rows if max_samples is None else min(max_samples, split.num_rows)
    where = _where(split)
    split = undecoded(split, columns)
    sizes, modes, labels = np.zeros((num_rows, 2), dtype=np.int64), set(), []
    for start in tqdm(range(0, num_rows, _DECODE_BATCH), desc=desc or "Checking images", unit="batch",
                      disable=desc is None):
        batch = split[start : min(start + _DECODE_BATCH, num_rows)]
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
    from tqdm.auto import tqdm

    num_rows = split.num_rows if max_samples is None else min(max_samples, split.num_rows)
    if num_rows == 0:
        raise DatasetError(f"No rows to read from column '{columns.image}' (max_samples={max_samples}).")
    where = _where(split)
    split = undecoded(split, columns)  # decode here, so an undecodable image is reported with its row
    images, labels = [], []
    for start in tqdm(range(0, num_rows, _DECODE_BATCH), desc=desc or "Decoding images", unit="batch",
                      disable=desc is None):
        batch = split[start : min(start + _DECODE_BATCH, num_rows)]
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
        self.where = _where(split)
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
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise DatasetError(f"--{name} must be positive, got {value}.")
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


def model_size(scans: Iterable[SplitScan], args: DataArguments) -> tuple[int, int]:
    """The models' input size: --image_size, else the one size every scanned image has (DatasetError if mixed)."""
    if args.image_size is not None:
        return tuple(args.image_size)
    scans = list(scans)
    sizes = {scan.uniform_size for scan in scans}
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


def load_training_data(args: DataArguments, dataset: ImageDataset | None = None) -> TrainingData:
    """The training split (of ``--dataset``) and evaluation split (of ``--eval_dataset``) in the models' view.

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
    size = model_size([train_scan, eval_scan], args)
    train_images = model_view(train, dataset.columns, mode, size, args.resize, args.keep_in_memory_mb,
                              "Decoding training images")
    eval_images = model_view(evaluation, eval_dataset.columns, mode, size, args.resize, args.keep_in_memory_mb,
                             "Decoding evaluation images")
    return TrainingData(train_images, torch.from_numpy(train_scan.labels), eval_images,
                        torch.from_numpy(eval_scan.labels), dataset.columns.class_names, dataset.dataset_id,
                        dataset.revision, eval_dataset.dataset_id, eval_dataset.revision, eval_name)


# ----------------------------------------------------------------------------------------------
# writing a Hub-layout dataset folder


def embed_image_bytes(split):
    """The split with every image's bytes inside the table (an ImageFolder row holds only a local path):
    what ``push_to_hub`` does, so a published split never points at the owner's disk. Paths keep only
    the file name."""
    from datasets.table import embed_table_storage

    if split.num_rows == 0:
        return split
    return split.with_format("arrow").map(embed_table_storage, batched=True, desc="Embedding image bytes").with_format(None)


_SHARD_BYTES = 500 * 1024 * 1024


def write_hub_layout(splits, folder: str | Path, card_data, card_body: str, config_name: str = "default") -> Path:
    """Write ``splits`` as ``folder/data/{split}-XXXXX-of-YYYYY.parquet`` plus a README card.

    The folder is exactly what ``push_to_hub`` would put in a repo (``configs`` and
    ``dataset_info`` in the card's YAML), so ``load_dataset(folder)`` works locally and one
    ``upload_folder`` publishes data and card in a single commit.
    """
    import math as _math

    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    folder = Path(folder)
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob("*.parquet"):
        stale.unlink()
    features = next(iter(splits.values())).features
    info = DatasetInfo(features=features, splits=SplitDict())
    info.dataset_size = 0
    for name, split in splits.items():
        num_bytes = split.data.nbytes
        num_shards = max(1, _math.ceil(num_bytes / _SHARD_BYTES))
        for index in range(num_shards):
            shard = split.shard(num_shards, index, contiguous=True)
            shard.to_parquet(str(data_dir / f"{name}-{index:05d}-of-{num_shards:05d}.parquet"))
        info.splits.add(SplitInfo(name=name, num_bytes=num_bytes, num_examples=split.num_rows))
        info.dataset_size += num_bytes
    DatasetInfosDict({config_name: info}).to_dataset_card_data(card_data)
    MetadataConfigs(
        {config_name: {"data_files": [{"split": name, "path": f"data/{name}-*"} for name in splits]}}
    ).to_dataset_card_data(card_data)
    DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{card_body}").save(folder / "README.md")
    return folder
