"""Random Self-Ensemble: noise layers before every convolution, ensembled over noise draws.

Liu et al., "Towards Robust Neural Networks via Random Self-ensemble", ECCV 2018,
https://arxiv.org/abs/1712.00673. Defaults: std 0.2 before the first convolution (pixel units),
0.1 before the others (activation units), prediction = sum of softmaxes over 10 draws.

Trainer evaluation calls ``eval_logits``: the log of the mean softmax over the draws, so
eval_accuracy is the ensemble's and eval_loss its negative log-likelihood. The saved weights
loaded without the hooks are the noiseless network (the card says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense

__all__ = ["RSEArguments", "RandomSelfEnsemble", "RSENoise", "add_rse_noise", "ensemble_log_probs"]


@dataclass
class RSEArguments:
    """Flags of ``--defense rse``."""

    rse_init_std: float = field(default=0.2, metadata={"help": "--defense rse: noise std before the first convolution, in pixel units (Liu et al. 2018)."})
    rse_inner_std: float = field(default=0.1, metadata={"help": "--defense rse: noise std before every other convolution."})
    rse_draws: int = field(default=10, metadata={"help": "--defense rse: noise draws whose softmaxes are summed at evaluation."})

    def __post_init__(self):
        if self.rse_init_std < 0 or self.rse_inner_std < 0 or self.rse_draws < 1:
            raise ValueError("--rse_init_std and --rse_inner_std must be >= 0 and --rse_draws >= 1, got "
                             f"{self.rse_init_std}, {self.rse_inner_std}, {self.rse_draws}.")


class RSENoise:
    """Gaussian noise before every ``nn.Conv2d`` of a model, via forward pre-hooks (``remove()`` undoes it).

    Hooks change no parameter and no state_dict key, and work on any architecture. The noise is
    active in training and evaluation alike (it is the defense, not a regularizer).
    """

    def __init__(self, model: nn.Module, init_std: float, inner_std: float, input_std=None):
        convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
        if not convs:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d: RSE adds its noise before convolutions.")
        first = convs[0]  # first in module order: the stem of timm models, which sees the image
        first_std = torch.as_tensor(init_std, dtype=torch.float32)
        if input_std is not None and len(input_std) == first.in_channels:
            # The image reaches the stem normalized; dividing by the processor's std puts the
            # first noise in pixel units ([0, 1] images), where the paper's 0.2 is defined.
            first_std = init_std / torch.tensor(input_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.num_layers = len(convs)
        self.handles = [first.register_forward_pre_hook(self._hook(first_std))]
        self.handles += [conv.register_forward_pre_hook(self._hook(torch.tensor(inner_std))) for conv in convs[1:]]

    @staticmethod
    def _hook(std: torch.Tensor):
        def add_noise(module, args):
            x = args[0]
            return (x + torch.randn_like(x) * std.to(x.device, x.dtype), *args[1:])

        return add_noise

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def add_rse_noise(model: nn.Module, init_std: float = 0.2, inner_std: float = 0.1, input_std=None) -> RSENoise:
    """Hooks RSE's Gaussian noise before every convolution of ``model`` (std in pixel / activation units)."""
    return RSENoise(model, init_std, inner_std, input_std)


def ensemble_log_probs(model, pixel_values: torch.Tensor, draws: int) -> torch.Tensor:
    """log of the mean softmax over ``draws`` noisy forwards (argmax = RSE's sum of softmaxes)."""
    log_probs = torch.stack([F.log_softmax(model(pixel_values=pixel_values).logits.float(), dim=-1)
                             for _ in range(draws)])
    return torch.logsumexp(log_probs, dim=0) - math.log(draws)


@register_defense("rse")
class RandomSelfEnsemble(Defense):
    """``--defense rse``: noise before every convolution, softmaxes summed over draws (Liu et al., ECCV 2018)."""

    arguments = RSEArguments

    def __init__(self, arguments: RSEArguments):
        super().__init__(arguments)
        self.init_std, self.inner_std, self.draws = arguments.rse_init_std, arguments.rse_inner_std, arguments.rse_draws
        self.noise: RSENoise | None = None

    def wrap_model(self, model):
        pretrained_cfg = getattr(getattr(model, "config", None), "pretrained_cfg", None) or {}
        self.noise = add_rse_noise(model, self.init_std, self.inner_std, pretrained_cfg.get("std"))
        return model

    def eval_logits(self, model, pixel_values):
        return ensemble_log_probs(model, pixel_values, self.draws)

    def describe(self) -> dict:
        settings = {"init_std": self.init_std, "inner_std": self.inner_std, "draws": self.draws,
                    "init_std_units": "pixels in [0, 1]", "inner_std_units": "activations"}
        if self.noise is not None:
            settings["noise_layers"] = self.noise.num_layers
        settings["note"] = (f"eval_accuracy is the {self.draws}-draw ensemble with noise; the saved weights loaded "
                            "alone give the noiseless network (sep_hf.defenses.rse.add_rse_noise restores the noise)")
        return settings
