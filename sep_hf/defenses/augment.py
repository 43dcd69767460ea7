"""Strong augmentation while training: a random policy per image plus mixup or cutmix per batch.

UEraser-style (Qin et al., "Learning the Unlearnable: Adversarial Augmentations Suppress
Unlearnable Example Attacks", 2023, https://arxiv.org/abs/2303.15127): heavy, label-preserving
image transformations break the shortcut a perturbation plants. Built from
``torchvision.transforms.v2``: TrivialAugmentWide (default) or RandAugment per image, then CutMix
or MixUp on the batch (soft targets). Applied to training batches only, after crop and flip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.transforms import v2

from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense

__all__ = ["AugmentArguments", "StrongAugmentation"]

POLICIES = ("trivial", "randaugment", "none")
MIXES = ("cutmix", "mixup", "both", "none")


@dataclass
class AugmentArguments:
    """Flags of ``--defense augment``."""

    augment_policy: str = field(default="trivial", metadata={"help": f"--defense augment: per-image policy, {' | '.join(POLICIES)}."})
    augment_magnitude: int = field(default=9, metadata={"help": "--defense augment: RandAugment magnitude (0-30)."})
    augment_mix: str = field(default="both", metadata={"help": f"--defense augment: batch mixing, {' | '.join(MIXES)} (both: one of the two per batch)."})
    augment_mix_alpha: float = field(default=1.0, metadata={"help": "--defense augment: Beta(alpha, alpha) of the mixing ratio."})

    def __post_init__(self):
        if self.augment_policy not in POLICIES:
            raise ValueError(f"--augment_policy must be one of {', '.join(POLICIES)}, got '{self.augment_policy}'.")
        if self.augment_mix not in MIXES:
            raise ValueError(f"--augment_mix must be one of {', '.join(MIXES)}, got '{self.augment_mix}'.")
        if self.augment_mix_alpha <= 0 or not 0 <= self.augment_magnitude <= 30:
            raise ValueError("--augment_mix_alpha must be > 0 and --augment_magnitude in 0..30.")


@register_defense("augment")
class StrongAugmentation(Defense):
    """``--defense augment``: a random augmentation policy per image, then mixup or cutmix (UEraser-style)."""

    arguments = AugmentArguments

    def __init__(self, arguments: AugmentArguments):
        super().__init__(arguments)

        self.policy = {"trivial": v2.TrivialAugmentWide(), "randaugment": v2.RandAugment(magnitude=arguments.augment_magnitude),
                       "none": None}[arguments.augment_policy]
        self.mix = arguments.augment_mix

    def _mixer(self, num_classes: int):

        alpha = self.settings.augment_mix_alpha
        choices = {"cutmix": [v2.CutMix(alpha=alpha, num_classes=num_classes)],
                   "mixup": [v2.MixUp(alpha=alpha, num_classes=num_classes)]}
        chosen = choices["cutmix"] + choices["mixup"] if self.mix == "both" else choices.get(self.mix, [])
        return v2.RandomChoice(chosen) if chosen else None

    def training_batch(self, trainer, pixel_values, labels):
        pixels = trainer.to_pixels(pixel_values)
        if self.policy is not None:  # the policies work per image, on uint8 like the images they were tuned on
            levels = pixels.mul(255).round_().clamp_(0, 255).to(torch.uint8)
            pixels = torch.stack([self.policy(image) for image in levels]).float().div_(255)
        targets = labels
        mixer = self._mixer(trainer.model.config.num_labels)
        if mixer is not None:
            pixels, targets = mixer(pixels, labels)
        return trainer.to_normalized(pixels), targets

    def describe(self) -> dict:
        settings = self.settings
        return {"policy": settings.augment_policy, "magnitude": settings.augment_magnitude, "mix": settings.augment_mix,
                "mix_alpha": settings.augment_mix_alpha, "library": "torchvision.transforms.v2",
                "applied_to": "training batches, after crop and flip"}
