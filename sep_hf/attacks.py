"""The one projected signed-gradient (L-inf PGD) loop: SEP, EM/REM and adversarial training use it.

Pixels are in [0, 1] and budgets in the same units. ``pgd`` moves ``x`` from ``start`` along the
sign of ``direction(x, step)`` (descending by default: protections minimize their loss; an attack
that maximizes passes ``ascend=True``) and projects onto the eps-ball around ``center`` and onto
[0, 1] after every step.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
https://arxiv.org/abs/1706.06083. Distance measure: L-inf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["project_linf", "sign_step", "pgd", "input_gradient", "uniform_start"]


def project_linf(x: torch.Tensor, center: torch.Tensor, eps: float) -> torch.Tensor:
    """The closest point of {|x - center| <= eps} ∩ [0, 1]^n (elementwise)."""
    return torch.minimum(torch.maximum(x, center - eps), center + eps).clamp_(0.0, 1.0)


def sign_step(x: torch.Tensor, direction: torch.Tensor, center: torch.Tensor, eps: float, step_size: float,
              ascend: bool = False) -> torch.Tensor:
    """One step of ``step_size`` along +/- sign(direction), projected back into the budget."""
    step = step_size * direction.sign()
    return project_linf(x + step if ascend else x - step, center, eps)


def uniform_start(center: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random point of the eps-ball (PGD's random start), drawn on the CPU for reproducibility."""
    if generator is None:
        noise = torch.empty_like(center).uniform_(-eps, eps)
    else:
        noise = ((torch.rand(center.shape, generator=generator) * 2 - 1) * eps).to(center.device)
    return project_linf(center + noise, center, eps)


def input_gradient(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """d loss_fn(x) / dx, without touching any parameter's ``.grad``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(loss_fn(x), x)[0]


def pgd(direction: Callable[[torch.Tensor, int], torch.Tensor], center: torch.Tensor, eps: float, step_size: float,
        steps: int, start: torch.Tensor | None = None, ascend: bool = False) -> torch.Tensor:
    """``steps`` projected signed steps from ``start`` (default ``center``); returns the final point, detached.

    ``direction(x, step)`` is usually an input gradient (``input_gradient``), but any direction
    works (SEP-FA-VR passes its variance-reduced accumulation).
    """
    center = center.detach()
    x = center.clone() if start is None else project_linf(start.detach(), center, eps)
    for step in range(steps):
        x = sign_step(x, direction(x, step).detach(), center, eps, step_size, ascend)
    return x
