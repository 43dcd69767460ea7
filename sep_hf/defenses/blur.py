"""Train on low-pass filtered images: a Gaussian blur removes high-frequency perturbations.

A plain purification an appropriator can run without clean data (the low-pass baseline of the
availability-poisoning defenses, e.g. APBench's filters). Separable Gaussian, radius 3 sigma,
reflect padding. Training images only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense
from sep_hf.squeezes import gaussian_blur

__all__ = ["BlurArguments", "Blur"]


@dataclass
class BlurArguments:
    """Flags of ``--defense blur``."""

    blur_sigma: float = field(default=1.0, metadata={"help": "--defense blur: Gaussian sigma in pixels."})

    def __post_init__(self):
        if not self.blur_sigma > 0:
            raise ValueError(f"--blur_sigma must be > 0, got {self.blur_sigma}.")


@register_defense("blur")
class Blur(Defense):
    """``--defense blur``: training images low-pass filtered by a Gaussian of ``--blur_sigma`` pixels."""

    arguments = BlurArguments

    def prepare_training_images(self, images):
        return gaussian_blur(images, self.settings.blur_sigma)

    def describe(self) -> dict:
        return {"sigma": self.settings.blur_sigma, "kernel": "gaussian, radius 3 sigma",
                "applied_to": "training images, once before training"}
