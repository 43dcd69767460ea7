"""Images <-> tensors: decoding as ``load_dataset`` shows an image, colour modes, PNG encoding.

Everything downstream works on ``uint8`` / ``float`` tensors of shape (N, C, H, W); floats are
pixels in [0, 1]. C = 1 (``L``), 2 (``LA``), 3 (``RGB``) or 4 (``RGBA``): a grayscale dataset stays
grayscale and alpha is kept (``split_alpha`` takes it off before the models and it is written back,
untouched, into the published PNGs).

Every image is decoded as ``load_dataset`` shows it (``decode_image``: the ``datasets`` decoder,
EXIF orientation applied, 16-bit and float images scaled to 8 bits) at its own resolution.
Perturbed pixels leave as PNG bytes quantized **by rounding** (never JPEG, never truncation), so a
budget that holds on the float tensor still holds on the published image.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import datasets
import numpy as np
import torch
from PIL import Image as PILImage

from sep_hf.data.load import DatasetError, ImageColumns
from sep_hf.models import resize_to_model
from sep_hf.squeezes import luma

DECODE_BATCH = 1000


def _to_pil(image) -> PILImage.Image:
    """An image as ``load_dataset`` shows it: Image-feature dicts and paths are decoded by ``datasets``
    itself (EXIF orientation applied, hf:// paths read), PIL images and HWC arrays are taken as they are."""
    if isinstance(image, PILImage.Image):
        return image
    if isinstance(image, (dict, str)):  # undecoded Image feature: {"bytes": ..., "path": ...} or a path

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
        colour = colour.expand(-1, 3, -1, -1) if wanted == 3 else luma(colour)
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
    """uint8 images (any shape) -> float32 pixels in [0, 1]."""
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

    if isinstance(split.features[columns.image], datasets.Image) and split.features[columns.image].decode:
        return split.cast_column(columns.image, datasets.Image(decode=False))
    return split


def encoded_bytes(split, columns: ImageColumns, batch_size: int = 1000) -> int:
    """Bytes of the split's images as stored (embedded bytes, or the size of the file a row points to)."""
    total, images = 0, undecoded(split, columns).select_columns([columns.image])
    for start in range(0, images.num_rows, batch_size):
        for value in images[start:start + batch_size][columns.image]:
            if value.get("bytes") is not None:
                total += len(value["bytes"])
            elif value.get("path"):
                total += os.path.getsize(value["path"])
    return total


def split_where(split) -> str:
    """How an error names a split: ``split 'train'`` (or its name in the dataset)."""
    return f" of split '{split.split}'" if split.split is not None else ""


def decode_batch(values: Sequence, mode: str, size: Sequence[int] | None = None, resize: Sequence[int] | None = None,
                 column: str = "image", where: str = "", first_row: int | Sequence[int] = 0) -> list[torch.Tensor] | torch.Tensor:
    """Decode images (``decode_image``) into ``mode``'s channels, as uint8 tensors.

    ``size=(H, W)``: the model's view: alpha dropped, each image resized with ``resize_to_model`` and
    rounded, returned stacked (N, C, H, W). ``size=None``: a list of (C, H, W) tensors at native
    resolution (or at ``resize``, PIL bicubic, when the user asked to publish at one size).
    ``first_row``: the row of ``values[0]`` (errors name ``first_row + position``), or every value's row.
    """

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
