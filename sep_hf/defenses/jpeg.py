"""Train on JPEG-recompressed images: compression squeezes out L-inf perturbations.

Liu, Zhao and Larson, "Image Shortcut Squeezing: Countering Perturbative Availability Poisons with
Compression" (ISS), ICML 2023, https://arxiv.org/abs/2301.13838. Default quality 10 (ISS's setting,
which lifts SEP from 3.85% to 84.37% on CIFAR-10). Training images only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL

from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense
from sep_hf.squeezes import jpeg

__all__ = ["JPEGArguments", "JPEGRecompression"]


@dataclass
class JPEGArguments:
    """Flags of ``--defense jpeg``."""

    jpeg_quality: int = field(default=10, metadata={"help": "--defense jpeg: JPEG quality of the recompressed training images (ISS: 10)."})

    def __post_init__(self):
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"--jpeg_quality must be in 1..95 (PIL's useful range), got {self.jpeg_quality}.")


@register_defense("jpeg")
class JPEGRecompression(Defense):
    """``--defense jpeg``: training images recompressed by libjpeg at ``--jpeg_quality`` (ISS, ICML 2023)."""

    arguments = JPEGArguments

    def prepare_training_images(self, images):
        return jpeg(images, self.settings.jpeg_quality)

    def describe(self) -> dict:

        return {"quality": self.settings.jpeg_quality, "chroma_subsampling": "4:2:0",
                "encoder": f"PIL {PIL.__version__}", "applied_to": "training images, once before training"}
