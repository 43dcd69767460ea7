"""What every protection shares: the ``datasets.map`` adapter and the sharded, resumable runner.

A protection is a pure function ``protect(images, labels, indices) -> images`` on float pixels in
[0, 1] (N, C, H, W); ``ProtectionTransform`` turns it into a batched ``Dataset.map`` function that
decodes the image column and writes lossless PNGs back. ``protect_split`` runs it over a split in
fixed shards, each cached to disk by ``map`` under a fingerprint of (method, config, weights or
key, source data, shard), so a killed run resumes where it stopped and N processes produce the
same bytes as one.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from sep_hf.data import images_to_uint8, quantize, tensor_to_png_images, uint8_to_float

__all__ = ["ProtectionTransform", "perturbation_stats", "protect_split", "budget_clamp", "config_hash"]

STATS_FEATURES = {"linf": "int32", "l2": "float32", "psnr": "float32"}


def config_hash(*parts) -> str:
    """Stable hash of JSON-able parts (configs as dicts, content hashes): no dill, no models."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def budget_clamp(protected: torch.Tensor, original: torch.Tensor, eps: float) -> torch.Tensor:
    """Quantize by rounding and enforce |x' - x| <= eps on the uint8 grid, for every pixel.

    Rounding alone can cross the budget when eps is not a multiple of 1/255 or when the original
    is off the 1/255 grid, so the rounded levels are clamped to the largest admissible integer
    distance from the (rounded) original.
    """
    levels = math.floor(eps * 255 + 1e-4)
    base = quantize(original).to(torch.int16)
    out = quantize(protected).to(torch.int16)
    out = torch.minimum(torch.maximum(out, base - levels), base + levels).clamp_(0, 255)
    return out.to(torch.uint8).float().div_(255.0)


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
    """Base of every protection's ``Dataset.map`` adapter (use ``batched=True, with_indices=True``).

    Subclasses implement ``protect`` and ``fingerprint``; ``extra_stats`` may add columns. Indices
    seed any per-example randomness, so results never depend on batching or process count.
    """

    name = "protection"
    extra_stat_features: dict[str, str] = {}
    protects_all_splits = True  # False: only the training split unless --protect_splits says otherwise

    def __init__(self, image_column: str | None = None, label_column: str | None = None, return_stats: bool = False):
        self.image_column = image_column
        self.label_column = label_column
        self.return_stats = return_stats

    # -- to implement --------------------------------------------------------------------------
    @classmethod
    def from_arguments(cls, context) -> "ProtectionTransform":
        """Build the transform for a protect.py run from a ``sep_hf.protect.ProtectionContext``."""
        raise NotImplementedError

    def protect(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identity of everything that determines the output (config, weights or key): caches key on it."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Settings for results.json and the dataset card: {"config": {...}} plus method extras. No secrets."""
        return {"config": {}}

    def extra_stats(self, protected: torch.Tensor, labels: torch.Tensor) -> dict[str, list]:
        return {}

    # -- the map function ------------------------------------------------------------------------
    def _columns(self, batch: dict) -> tuple[str, str]:
        image, label = self.image_column, self.label_column
        if image is None:
            candidates = [k for k, v in batch.items() if v and _looks_like_image(v[0])]
            if len(candidates) != 1:
                raise ValueError(f"Cannot tell the image column among {list(batch)}; pass image_column=.")
            image = candidates[0]
        if label is None:
            candidates = [k for k in ("label", "labels", "fine_label") if k in batch]
            if not candidates:
                raise ValueError(f"Cannot tell the label column among {list(batch)}; pass label_column=.")
            label = candidates[0]
        return image, label

    def __call__(self, batch: dict, indices: list[int] | None = None) -> dict:
        image_column, label_column = self._columns(batch)
        images = uint8_to_float(images_to_uint8(batch[image_column], column=image_column))
        labels = torch.as_tensor(batch[label_column], dtype=torch.long)
        if indices is None:
            indices = range(len(labels))
        protected = self.protect(images, labels, torch.as_tensor(list(indices), dtype=torch.long)).cpu()
        output = {image_column: tensor_to_png_images(protected)}
        if self.return_stats:
            output.update(perturbation_stats(images, protected))
            output.update(self.extra_stats(protected, labels))
        return output

    def output_features(self, features):
        import datasets

        features = features.copy()
        if self.return_stats:
            for name, dtype in {**STATS_FEATURES, **self.extra_stat_features}.items():
                features[name] = datasets.Value(dtype)
        return features


def _looks_like_image(value) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image) or (isinstance(value, dict) and "bytes" in value)


def protect_split(
    split,
    transform: ProtectionTransform,
    work_dir: str | Path,
    shard_size: int = 1000,
    batch_size: int = 250,
    process_index: int = 0,
    num_processes: int = 1,
    desc: str = "Protecting",
):
    """Run ``transform`` over ``split`` in shards of ``shard_size`` rows, cached under ``work_dir``.

    Process ``i`` of ``n`` crafts shards ``i, i+n, ...``; each finished shard is an Arrow file that
    ``map`` wrote atomically. Returns the shard paths in order (every process gets the full list;
    call ``load_shards`` once all processes are done).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(split.num_rows / shard_size)
    base = config_hash(transform.name, transform.fingerprint(), split._fingerprint, shard_size, transform.return_stats)
    features = transform.output_features(split.features)
    paths = []
    for shard_index in range(num_shards):
        start, stop = shard_index * shard_size, min((shard_index + 1) * shard_size, split.num_rows)
        path = work_dir / f"shard-{shard_index:05d}-of-{num_shards:05d}-{base[:16]}.arrow"
        paths.append(path)
        if shard_index % num_processes != process_index or path.exists():
            continue

        def with_global_indices(batch, local_indices, offset=start):
            return transform(batch, [offset + i for i in local_indices])

        split.select(range(start, stop)).map(
            with_global_indices, batched=True, batch_size=batch_size, with_indices=True, features=features,
            cache_file_name=str(path), new_fingerprint=config_hash(base, shard_index)[:32],
            desc=f"{desc} [shard {shard_index + 1}/{num_shards}]",
        )
    return paths


def load_shards(paths: list[Path]):
    import datasets

    missing = [str(path) for path in paths if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) were not crafted: {missing[:3]}...")
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in paths])
