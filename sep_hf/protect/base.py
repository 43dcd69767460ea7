"""The protection contract, its ``datasets.map`` adapter, and the sharded, resumable runner.

A protection is a ``ProtectionTransform`` subclass registered under one or more names:

* ``from_arguments(context)`` builds it for a ``protect.py`` run (``context.arguments(cls.arguments)``
  is its parsed flag dataclass with the preset applied; ``context.train_tensors``, ``context.ensemble``
  and friends are shared, decoded-once resources); ``check_arguments(context)``, called before any
  image is decoded, refuses flags that would only fail later (optional);
* ``protect(images, labels, indices) -> images`` on float pixels in [0, 1] (N, C, H, W): the colour
  channels of the source, C = 1 for a grayscale (L) dataset and 3 for RGB; an alpha channel never
  reaches a protection, it is copied unchanged into the published image;
* ``fingerprint()``: everything that determines the output (cache key of the crafted shards);
* ``describe()``: its settings for results.json; ``card_lines(results)``: its lines on the card.

``protect_split`` runs a transform over a split in fixed shards, each cached to disk by ``map``
under a fingerprint of (method, config, weights or key, source data, shard), so a killed run
resumes where it stopped and N processes produce the same bytes as one; a shard is written in its
process's scratch folder and renamed into place, so a kill or a full disk leaves no part of one.
Images reach ``protect`` at their own resolution, one size per call (a model resizes them itself:
``models.resize_to_model``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import ClassVar

import datasets
import torch

from sep_hf.budget import Budget
from sep_hf.data.images import (
    decode_batch,
    decode_image,
    split_alpha,
    tensor_to_png_images,
    uint8_to_float,
    union_mode,
)
from sep_hf.utils.io import scratch_folder
from sep_hf.utils.logging import get_logger

__all__ = ["ProtectionTransform", "perturbation_stats", "protect_split", "load_shards", "split_summary",
           "config_hash", "STATS_FEATURES", "SEP_PAPER"]

logger = get_logger(__name__)

STATS_FEATURES = {"linf": "int32", "l2": "float32", "psnr": "float32"}
SEP_PAPER = {"title": "Self-Ensemble Protection: Training Checkpoints Are Good Data Protectors",
             "authors": "Chen et al., ICLR 2023", "url": "https://openreview.net/forum?id=9MO7bjoAfIA"}


def config_hash(*parts) -> str:
    """Stable hash of JSON-able parts (configs as dicts, content hashes): no dill, no models."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def perturbation_stats(original: torch.Tensor, protected: torch.Tensor) -> dict[str, list]:
    """Per-example L-inf (in 1/255 levels), L2 (pixels in [0, 1]) and PSNR (dB, capped at 100)."""
    delta = (protected - original).flatten(1)
    mse = delta.pow(2).mean(1).clamp_min(1e-10)
    return {
        "linf": (delta.abs().amax(1) * 255).round().int().tolist(),
        "l2": delta.norm(dim=1).tolist(),
        "psnr": (10 * torch.log10(1.0 / mse)).tolist(),
    }


class ProtectionTransform:
    """Base of every protection; also its ``Dataset.map`` function (``batched=True, with_indices=True``).

    Indices seed any per-example randomness, so results never depend on batching or process count.
    """

    name = "protection"  # the registered name this instance was built for (a class may serve several)
    arguments: ClassVar[type | None] = None  # the method's flag dataclass (recipes/protect.py parses it)
    protects_all_splits: ClassVar[bool] = True  # False: only the training split unless --protect_splits
    has_budget: ClassVar[bool] = True  # an L-inf method: --eps is its budget, checked after crafting
    paper: ClassVar[dict] = {}
    extra_stat_features: ClassVar[dict[str, str]] = {}

    def __init__(self, image_column: str, label_column: str, return_stats: bool = False):
        self.image_column = image_column
        self.label_column = label_column
        self.return_stats = return_stats

    # -- the contract ---------------------------------------------------------------------------
    @classmethod
    def argument_classes(cls) -> set[type]:
        """Every flag dataclass this method reads: its own and its bases' (sep-robust reads SEP's too)."""
        return {klass.__dict__["arguments"] for klass in cls.__mro__ if klass.__dict__.get("arguments")}

    @classmethod
    def from_arguments(cls, context) -> ProtectionTransform:
        """Build the transform for a protect.py run from a ``sep_hf.protect.job.ProtectionContext``."""
        raise NotImplementedError

    @classmethod
    def check_arguments(cls, context, name: str) -> None:
        """Refuse, before any image is decoded, flags that would only fail once work has started (ValueError);
        e.g. SEP's ensemble larger than the source run will keep. Default: nothing to check."""

    def protect(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The protected images: float pixels (N, C, H, W) in [0, 1], one size per call (a ``ragged`` method
        also gets zero-padded canvases), ``labels`` int64 (N,), ``indices`` the global example indices (N,)
        that seed every per-example random choice. Returns float pixels of the same shape on the 1/255
        grid, within the method's budget (``eps``) of ``images`` for every pixel."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identity of everything that determines the output (config, weights or key): caches key on it."""
        raise NotImplementedError

    @property
    def eps(self) -> float | None:
        """The L-inf budget in [0, 1] pixel units (None for methods without one)."""
        return self.config.eps if self.has_budget else None

    def describe(self) -> dict:
        """Settings for results.json and the card: {"config": {...}, "eps": levels or None, ...}. No secrets."""
        config = getattr(self, "config", None)

        return {"config": asdict(config) if is_dataclass(config) else {},
                "eps": Budget.from_pixels(self.eps).levels if self.eps is not None else None, "paper": self.paper}

    def card_lines(self, results: dict) -> list[str]:
        """Markdown bullet lines that state the method and its budget on the dataset card."""
        description = self.describe()
        if description["eps"] is None:
            return [f"- method: `{self.name}`, no L-inf budget: {description.get('budget', '--eps does not apply')}"]
        steps = f", {description['steps']} steps of {description['step_size']:g}/255" if description.get("steps") else ""
        return [f"- method: `{self.name}`, L-inf budget eps = {description['eps']}/255{steps} (whole 1/255 levels)"]

    def extra_stats(self, protected: torch.Tensor, labels: torch.Tensor) -> dict[str, list]:
        return {}

    # -- the map function ------------------------------------------------------------------------
    ragged: ClassVar[bool] = False  # True: protect(..., sizes=) takes images of different sizes in one canvas
    canvas_elements: ClassVar[int] = 2**25  # largest zero-padded canvas (N x C x Hmax x Wmax) protected at once

    def outputs(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                alpha: torch.Tensor | None = None, sizes: torch.Tensor | None = None) -> dict:
        """Protect float images and return the map output: PNG images (+ per-example statistics).

        ``images`` are colour channels only; ``alpha`` (uint8 (N, 1, H, W), or None) is written back
        unchanged, so an RGBA (LA) source is published RGBA (LA) with the same alpha. ``sizes`` (N, 2):
        a zero-padded canvas of images of different sizes (``ragged`` methods), each cropped back.
        """
        if sizes is None:
            protected = self.protect(images, labels, indices).cpu()
            output = {self.image_column: tensor_to_png_images(protected, alpha)}
            if self.return_stats:
                output.update(perturbation_stats(images, protected))
                output.update(self.extra_stats(protected, labels))
            return output
        protected = self.protect(images, labels, indices, sizes=sizes).cpu()
        crops = [(images[i, :, :h, :w], protected[i, :, :h, :w], None if alpha is None else alpha[i, :, :h, :w])
                 for i, (h, w) in enumerate(sizes.tolist())]
        output = {self.image_column: [tensor_to_png_images(after[None], None if a is None else a[None])[0]
                                      for _, after, a in crops]}
        if self.return_stats:
            for before, after, _ in crops:
                for name, values in perturbation_stats(before[None], after[None]).items():
                    output.setdefault(name, []).extend(values)
            output.update(self.extra_stats([after for _, after, _ in crops], labels))
        return output

    def bucketed_outputs(self, images: list[torch.Tensor], labels: torch.Tensor, indices: torch.Tensor) -> dict:
        """``outputs`` of uint8 (C, H, W) images of any sizes, rows returned in their order. The last
        channel of a 2- or 4-channel image is alpha.

        Images of one size are protected as one batch. A ``ragged`` method also takes images of
        different sizes together: sorted by size, they are packed into zero-padded canvases of at most
        ``canvas_elements`` elements, so random photo sizes still make full batches.
        """
        if self.ragged:
            groups, current, height, width = [], [], 0, 0
            for position in sorted(range(len(images)), key=lambda p: tuple(images[p].shape)):
                channels, h, w = images[position].shape
                if current and (len(current) + 1) * channels * max(height, h) * max(width, w) > self.canvas_elements:
                    groups.append(current)
                    current, height, width = [], 0, 0
                current.append(position)
                height, width = max(height, h), max(width, w)
            groups.append(current)
        else:
            by_size: dict[tuple, list[int]] = {}
            for position, image in enumerate(images):
                by_size.setdefault(tuple(image.shape), []).append(position)
            groups = list(by_size.values())
        merged: dict[str, list] = {}
        for positions in groups:
            rows = torch.as_tensor(positions)
            shapes = {tuple(images[p].shape) for p in positions}
            if len(shapes) == 1:
                batch, sizes = torch.stack([images[p] for p in positions]), None
            else:
                channels = images[positions[0]].shape[0]
                height, width = (max(images[p].shape[axis] for p in positions) for axis in (1, 2))
                batch = torch.zeros(len(positions), channels, height, width, dtype=torch.uint8)
                for slot, p in enumerate(positions):
                    batch[slot, :, : images[p].shape[1], : images[p].shape[2]] = images[p]
                sizes = torch.as_tensor([tuple(images[p].shape[1:]) for p in positions])
            colour, alpha = split_alpha(batch)
            part = self.outputs(uint8_to_float(colour), labels[rows], indices[rows], alpha, sizes)
            for name, values in part.items():
                merged.setdefault(name, [None] * len(images))
                for position, value in zip(positions, values):
                    merged[name][position] = value
        return merged

    def __call__(self, batch: dict, indices: list[int] | None = None) -> dict:
        """The ``Dataset.map`` function: images of any sizes and modes (the batch's union mode)."""
        pictures = [decode_image(value, None, self.image_column) for value in batch[self.image_column]]
        images = decode_batch(pictures, union_mode(picture.mode for picture in pictures), column=self.image_column)
        labels = torch.as_tensor(batch[self.label_column], dtype=torch.long)
        indices = torch.as_tensor(list(range(len(labels)) if indices is None else indices), dtype=torch.long)
        return self.bucketed_outputs(images, labels, indices)

    def output_features(self, features):

        features = features.copy()
        if self.return_stats:
            for name, dtype in {**STATS_FEATURES, **self.extra_stat_features}.items():
                features[name] = datasets.Value(dtype)
        return features


def protect_split(
    split,
    transform: ProtectionTransform,
    work_dir: str | Path,
    mode: str,
    shard_size: int = 1000,
    batch_size: int = 250,
    process_index: int = 0,
    num_processes: int = 1,
    desc: str = "Protecting",
    resize=None,
):
    """Run ``transform`` over ``split`` in shards of ``shard_size`` rows, cached under ``work_dir``.

    Each batch is read from the (memory-mapped) Arrow table and decoded here (``decode_batch``) in
    ``mode`` (the published one; an alpha channel is split off and copied unchanged) at each image's
    own size (or at ``resize``) and protected by ``bucketed_outputs`` (by size, or in zero-padded
    canvases for ``ragged`` methods), with no per-pixel loop. Memory: one batch, whatever the split's size.
    Process ``i`` of ``n`` crafts shards ``i, i+n, ...``; each finished shard is an Arrow file written in
    the process's scratch folder and renamed into place. Returns the shard paths in order (call
    ``load_shards`` once all are done).
    """

    work_dir = Path(work_dir)
    num_shards = math.ceil(split.num_rows / shard_size)
    where = f" of split '{split.split}'" if split.split is not None else ""
    # The output mode keys the cache too (RGB keeps its historical key, so existing RGB shards still resume).
    base = config_hash(transform.name, transform.fingerprint(), split._fingerprint, shard_size, transform.return_stats,
                       *(() if mode == "RGB" else (mode,)), *(() if resize is None else (list(resize),)))
    features = transform.output_features(split.features)
    encoded = split.cast_column(transform.image_column, datasets.Image(decode=False))  # decoded here, row named
    paths = []
    # Not atomic_write: datasets writes a temporary file of its own beside cache_file_name and leaves it
    # behind when the disk fills (its clean-up fails too); in this process's scratch folder it is removed.
    with scratch_folder(work_dir / f".partial-{process_index}") as staging:
        for shard_index in range(num_shards):
            start, stop = shard_index * shard_size, min((shard_index + 1) * shard_size, split.num_rows)
            path = work_dir / f"shard-{shard_index:05d}-of-{num_shards:05d}-{base[:16]}.arrow"
            paths.append(path)
            if shard_index % num_processes != process_index or _finished(path):
                continue

            def protect_rows(values, batch_labels, local_indices, offset=start):
                index = torch.as_tensor(local_indices, dtype=torch.long) + offset
                images = decode_batch(values, mode, None, resize, transform.image_column, where, int(index[0]))
                return transform.bucketed_outputs(images, torch.as_tensor(batch_labels, dtype=torch.long), index)

            encoded.select(range(start, stop)).map(
                protect_rows, input_columns=[transform.image_column, transform.label_column], batched=True,
                batch_size=batch_size, with_indices=True, features=features, cache_file_name=str(staging / path.name),
                new_fingerprint=config_hash(base, shard_index)[:32], desc=f"{desc} [shard {shard_index + 1}/{num_shards}]",
            )
            os.replace(staging / path.name, path)
    return paths


def _finished(path: Path) -> bool:
    """A shard file that exists and reads back; a truncated one (a crash while the OS flushed it) is redone."""
    if not path.exists():
        return False

    try:
        datasets.Dataset.from_file(str(path))
        return True
    except Exception as err:  # noqa: BLE001 - Arrow raises OSError or ArrowInvalid, depending on where it is cut
        logger.warning("Crafted shard %s is unreadable (%s); crafting it again.", path.name, err)
        path.unlink()
        return False


def load_shards(paths: list[Path]):

    """The crafted Arrow shards of a split, concatenated in row order (memory-mapped)."""
    missing = [str(path) for path in paths if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) were not crafted: {missing[:3]}...")
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in paths])


def split_summary(split, transform: ProtectionTransform) -> dict:
    """Aggregate a crafted split's statistics columns: max L-inf, mean PSNR / L2, mean of every extra stat."""
    extra = [name for name in transform.extra_stat_features if name in split.column_names]
    columns = split.select_columns(list(STATS_FEATURES) + extra).with_format("numpy")[:]
    summary = {"num_examples": split.num_rows, "max_linf": int(columns["linf"].max()),
               "mean_linf": float(columns["linf"].mean()), "mean_psnr": float(columns["psnr"].mean()),
               "mean_l2": float(columns["l2"].mean())}
    summary.update({f"mean_{name}": float(columns[name].mean()) for name in extra})
    return summary
