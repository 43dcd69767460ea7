"""Train on grayscale images (3 channels kept): squeezes colour-coded perturbations.

Grayscale is ISS's squeeze for low-frequency / colour perturbations (Liu et al., ICML 2023,
https://arxiv.org/abs/2301.13838). Luma weights ITU-R 601-2. Training images only.
"""

from __future__ import annotations

from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense
from sep_hf.squeezes import LUMA_WEIGHTS, grayscale

__all__ = ["Grayscale"]


@register_defense("grayscale")
class Grayscale(Defense):
    """``--defense grayscale``: training images as PIL's luma on 3 channels (ISS, ICML 2023)."""

    def prepare_training_images(self, images):
        return grayscale(images)

    def describe(self) -> dict:
        return {"luma_weights": list(LUMA_WEIGHTS), "channels": 3, "applied_to": "training images, once before training"}
