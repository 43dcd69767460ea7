"""The defense contract: hooks that ``sep_hf.victim.trainer`` calls at fixed points of one Trainer loop.

- ``prepare_training_images(images)``: once before training, on the uint8 TRAINING images only
  (the evaluation split is never touched): JPEG recompression, grayscale, bit depth, blur.
- ``training_inputs(trainer, pixel_values, labels)``: every training step, on the augmented,
  normalized batch (``trainer.to_pixels`` / ``trainer.to_normalized`` convert): PGD examples.
  ``training_batch`` returns (inputs, targets) and may change the targets too (mixup, cutmix).
- ``wrap_model(model)``: once, on the ``TimmWrapperForImageClassification``, leaving its parameters
  (names and values) untouched so the saved checkpoint loads with ``AutoModelForImageClassification``.
- ``eval_logits(model, pixel_values)``: every evaluation batch: RSE's ensemble of noise draws.
- ``describe()``: the settings written to results.json and shown on the cards.

A defense's flags are its own dataclass (``arguments``); budgets are in 1/255 like every budget.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import ClassVar

import torch

from sep_hf.defenses import register_defense

__all__ = ["Defense"]


@register_defense("none")
class Defense:
    """Standard training: every hook is the identity. Subclasses override the hooks they need."""

    arguments: ClassVar[type | None] = None

    def __init__(self, arguments=None):
        self.settings = arguments

    @property
    def name(self) -> str:
        return self.registered_names[0]

    def prepare_training_images(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def training_inputs(self, trainer, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pixel_values

    def training_batch(self, trainer, pixel_values: torch.Tensor, labels: torch.Tensor):
        """(inputs, targets) of one training step; targets may be soft (N, C) class probabilities (mixup)."""
        return self.training_inputs(trainer, pixel_values, labels), labels

    def wrap_model(self, model):
        return model

    def eval_logits(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    def describe(self) -> dict:
        """The flags without their defense prefix (``at_eps`` -> ``eps``), plus what a subclass adds."""
        if not is_dataclass(self.settings):
            return {}
        prefix = f"{self.name}_"
        return {key.removeprefix(prefix): value for key, value in asdict(self.settings).items()}
