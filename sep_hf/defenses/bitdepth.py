"""Train on bit-depth-reduced images: ISS's third squeeze, for perturbations below a quantization step.

Liu, Zhao and Larson, "Image Shortcut Squeezing" (ISS), ICML 2023, https://arxiv.org/abs/2301.13838
(grayscale, JPEG and bit-depth reduction). Each channel keeps ``--bitdepth_bits`` bits (at most
2**bits levels). Training images only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense
from sep_hf.squeezes import bit_depth

__all__ = ["BitDepthArguments", "BitDepth"]


@dataclass
class BitDepthArguments:
    """Flags of ``--defense bitdepth``."""

    bitdepth_bits: int = field(default=4, metadata={"help": "--defense bitdepth: bits kept per channel (1-7)."})

    def __post_init__(self):
        if not 1 <= self.bitdepth_bits <= 7:
            raise ValueError(f"--bitdepth_bits must be in 1..7 (8 changes nothing), got {self.bitdepth_bits}.")


@register_defense("bitdepth")
class BitDepth(Defense):
    """``--defense bitdepth``: training images keep ``--bitdepth_bits`` bits per channel (ISS, ICML 2023)."""

    arguments = BitDepthArguments

    def prepare_training_images(self, images):
        return bit_depth(images, self.settings.bitdepth_bits)

    def describe(self) -> dict:
        return {"bits": self.settings.bitdepth_bits, "applied_to": "training images, once before training"}
