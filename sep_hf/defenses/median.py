"""Train on median-filtered images: the adaptive answer to sparse, large pixel changes (one-pixel shortcuts).

A k x k median replaces every pixel by the median of its neighbourhood, per channel: an isolated
pixel set far from its neighbours (OPS, Wu et al., "One-Pixel Shortcut", ICLR 2023) disappears
completely, while edges survive better than under a blur of the same size: the standard answer to
sparse perturbations, and the matching column for sep-robust's ``--pixel_shortcuts``. Not from a paper
(a textbook filter). Reflect padding. Training images only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense

__all__ = ["MedianArguments", "MedianFilter", "median_filter"]


@dataclass
class MedianArguments:
    """Flags of ``--defense median``."""

    median_size: int = field(default=3, metadata={"help": "--defense median: the filter's side in pixels (odd)."})

    def __post_init__(self):
        if self.median_size < 3 or self.median_size % 2 == 0:
            raise ValueError(f"--median_size must be an odd number >= 3, got {self.median_size}.")


def median_filter(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` (N, C, H, W), any dtype, each channel replaced by its ``size`` x ``size`` neighbourhood median."""
    pad = size // 2
    batch, channels, height, width = images.shape
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    patches = padded.unfold(2, size, 1).unfold(3, size, 1)  # (N, C, H, W, size, size)
    return patches.reshape(batch, channels, height, width, -1).median(dim=-1).values.to(images.dtype)


@register_defense("median")
class MedianFilter(Defense):
    """``--defense median``: training images median-filtered over ``--median_size`` pixels."""

    arguments = MedianArguments

    def prepare_training_images(self, images):
        return torch.cat([median_filter(chunk, self.settings.median_size) for chunk in images.split(1024)])

    def describe(self) -> dict:
        return {"size": self.settings.median_size, "padding": "reflect",
                "applied_to": "training images, once before training"}
