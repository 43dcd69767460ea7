"""The L-inf budget of a protection, in one type from the ``--eps`` flag to the published pixels.

Pixels are published as uint8, so a budget is a whole number of 1/255 levels: ``--eps 8`` is
``Budget(8)``, ``--eps 1.5`` is applied (and stated) as ``Budget(1)``, ``--eps 0.5`` is refused. The
crafting math works in pixels in [0, 1] (``budget.pixels``, the papers' eps = 8/255); results, cards and
checks state levels (``budget.levels``, ``str(budget)`` = ``"8/255"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sep_hf.data.images import quantize

__all__ = ["Budget", "DEFAULT_LEVELS"]

DEFAULT_LEVELS = 8  # the SEP paper's headline budget, 8/255


@dataclass(frozen=True)
class Budget:
    """An L-inf budget of ``levels`` / 255 per pixel (1 <= levels <= 255)."""

    levels: int

    def __post_init__(self):
        if not isinstance(self.levels, int) or not 1 <= self.levels <= 255:
            raise ValueError(f"An L-inf budget is a whole number of 1/255 levels in [1, 255]; got {self.levels!r}.")

    @classmethod
    def from_eps(cls, eps: float | None, flag: str = "--eps") -> Budget:
        """The budget of a flag in 1/255 units (None: 8/255), rounded down to whole levels.

        Raises ValueError, naming ``flag``, outside (0, 255] or below one level (it would change nothing).
        """
        if eps is None:
            return cls(DEFAULT_LEVELS)
        if not 0 < eps <= 255:
            raise ValueError(f"{flag} is in 1/255 units and must be in (0, 255]; got {eps:g}.")
        levels = math.floor(eps + 1e-6)
        if levels < 1:
            raise ValueError(f"{flag} {eps:g} is below one 1/255 level: pixels are published as uint8, so the "
                             f"protection would change nothing. Use {flag} 1 or more (2, 4, 8).")
        return cls(levels)

    @classmethod
    def from_pixels(cls, eps: float) -> Budget:
        """The whole levels inside a budget in [0, 1] pixel units (2.5/255 -> 2/255)."""
        return cls(math.floor(eps * 255 + 1e-4))

    @property
    def pixels(self) -> float:
        """The budget in [0, 1] pixel units, what the crafting loops use."""
        return self.levels / 255

    def clamp(self, protected: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Quantize ``protected`` (float pixels, any shape) by rounding and enforce |x' - x| <= budget on the
        uint8 grid, for every pixel; returns float pixels on the 1/255 grid.

        Rounding alone can cross the budget when the original is off the 1/255 grid, so the rounded levels
        are clamped to the largest admissible integer distance from the (rounded) original.
        """
        base = quantize(original).to(torch.int16)
        out = quantize(protected).to(torch.int16)
        out = torch.minimum(torch.maximum(out, base - self.levels), base + self.levels).clamp_(0, 255)
        return out.to(torch.uint8).float().div_(255.0)

    def __str__(self) -> str:
        return f"{self.levels}/255"
