"""PGD adversarial training: train on L-inf PGD examples of every augmented batch.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
https://arxiv.org/abs/1706.06083. Defaults: eps 4/255 (8/255 with ``--at_eps 8``), 10 steps of
eps/4, uniform random start, cross-entropy without label smoothing.

By default the attack runs with the model in TRAIN mode, as in Madry's code: the examples maximize the very
loss the step then minimizes (batch statistics of the batch being attacked), and a model early in
training has meaningless running statistics, so an eval-mode attack would target a different
function. Madry's BatchNorm updated its moving averages only in the training op, so the attack's
passes must not move them either: every buffer is snapshotted and restored around the attack
(``frozen_buffers``), and only the final training forward updates them. ``--at_attack_mode eval``
attacks the model in eval mode instead (running statistics), the protocol of the EM and ISS papers'
AT baselines, usually with ``--at_eps 8``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sep_hf.attacks import input_gradient, pgd, uniform_start
from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense

__all__ = ["ATArguments", "AdversarialTraining", "frozen_buffers"]


@dataclass
class ATArguments:
    """Flags of ``--defense at`` (budgets in 1/255)."""

    at_eps: float = field(default=4.0, metadata={"help": "--defense at: L-inf budget of PGD adversarial training in 1/255 (Madry et al.; 4 or 8)."})
    at_steps: int = field(default=10, metadata={"help": "--defense at: PGD steps per training batch."})
    at_step_size: float | None = field(default=None, metadata={"help": "--defense at: PGD step in 1/255 (default: at_eps / 4)."})
    at_random_start: bool = field(default=True, metadata={"help": "--defense at: start PGD from a uniform point of the eps-ball."})
    at_attack_mode: str = field(default="train", metadata={"help": "--defense at: model mode during the attack: train (Madry; batch statistics) or eval (the EM/ISS protocol; running statistics)."})

    def __post_init__(self):
        if self.at_attack_mode not in ("train", "eval"):
            raise ValueError(f"--at_attack_mode must be 'train' or 'eval', got '{self.at_attack_mode}'.")
        if self.at_eps <= 0 or self.at_steps < 1:
            raise ValueError(f"--at_eps must be > 0 and --at_steps >= 1, got {self.at_eps} and {self.at_steps}.")
        if self.at_step_size is not None and self.at_step_size <= 0:
            raise ValueError(f"--at_step_size must be > 0 (in 1/255), got {self.at_step_size}; omit it for eps/4.")


@contextmanager
def frozen_buffers(model: nn.Module):
    """Restore every buffer (BatchNorm running statistics, counters) on exit."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@register_defense("at")
class AdversarialTraining(Defense):
    """``--defense at``: trains on PGD examples of radius ``--at_eps`` / 255 (Madry et al., ICLR 2018)."""

    arguments = ATArguments

    def __init__(self, arguments: ATArguments):
        super().__init__(arguments)
        self.eps, self.steps, self.random_start = arguments.at_eps, arguments.at_steps, arguments.at_random_start
        self.step_size = arguments.at_step_size if arguments.at_step_size is not None else arguments.at_eps / 4
        self.attack_mode = arguments.at_attack_mode

    def training_inputs(self, trainer, pixel_values, labels):
        # trainer.model is the unwrapped model: a DDP wrapper expects a backward after each forward.
        model = trainer.model

        def loss(pixels):
            normalized = trainer.to_normalized(pixels).contiguous(memory_format=torch.channels_last)
            # summed: each example's gradient does not shrink with the batch size
            return F.cross_entropy(model(pixel_values=normalized).logits.float(), labels, reduction="sum")

        pixels, eps = trainer.to_pixels(pixel_values).detach(), self.eps / 255
        with frozen_buffers(model):
            model.train(self.attack_mode == "train")
            start = uniform_start(pixels, eps) if self.random_start else None
            adversarial = pgd(lambda x, step: input_gradient(loss, x), pixels, eps, self.step_size / 255, self.steps,
                              start=start, ascend=True)
            model.train()
        return trainer.to_normalized(adversarial)

    def describe(self) -> dict:
        return {"eps": self.eps, "steps": self.steps, "step_size": self.step_size, "random_start": self.random_start,
                "norm": "Linf", "units": "1/255",
                "attack_mode": "train (batch statistics; running statistics frozen during the attack)"
                if self.attack_mode == "train" else "eval (running statistics)"}
