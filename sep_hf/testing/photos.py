"""A data owner's photo folder built from CIFAR-10: what most people have on disk (test double).

``build_photo_folder`` writes an ImageFolder tree (``train/<class name>/<n>.jpg``, one split only)
of CIFAR-10 images upscaled (bicubic) to a random size each, ``min_px`` to ``max_px`` on
each side independently, saved as JPEG. Used by the tests and by ``bench/own_dataset.py``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["build_photo_folder", "CIFAR10_NAMES"]

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def build_photo_folder(cifar_dir: str | Path, folder: str | Path, num_images: int, min_px: int = 64, max_px: int = 320,
                       seed: int = 0, quality: int = 90, split: str = "train", first_row: int = 0) -> Path:
    """Write ``num_images`` CIFAR-10 ``split`` images (from row ``first_row``) as JPEGs of random sizes.

    Returns ``folder``; ``folder/<split>/<class>/<row>.jpg`` (a ``test`` folder is the test split of
    ``load_dataset``). Sizes are drawn from ``seed`` only.
    """
    import pyarrow.parquet as pq

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    written, skipped = 0, 0
    for file in sorted((Path(cifar_dir) / "data").glob(f"{split}-*.parquet")):
        table = pq.read_table(file, columns=["img", "label"])
        if skipped + table.num_rows <= first_row:
            skipped += table.num_rows
            continue
        images, labels = table.column("img").to_pylist(), table.column("label").to_pylist()
        for row in range(max(0, first_row - skipped), table.num_rows):
            height, width = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
            image = Image.open(io.BytesIO(images[row]["bytes"])).convert("RGB").resize((width, height), Image.BICUBIC)
            target = folder / split / CIFAR10_NAMES[labels[row]] / f"{skipped + row:06d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, format="JPEG", quality=quality)
            written += 1
            if written == num_images:
                return folder
        skipped += table.num_rows
    raise ValueError(f"{cifar_dir} has fewer than {first_row + num_images} '{split}' images.")
