"""Expectation over transformations: random differentiable views of a batch, and low-frequency directions.

A protection that crafts *through* an appropriator's squeezes evaluates its loss on a random view
T(x') instead of x' (Athalye et al., "Synthesizing Robust Adversarial Examples", ICML 2018,
https://arxiv.org/abs/1707.07397). The views are the differentiable versions of the defenses'
squeezes in ``sep_hf.squeezes``, with the defenses' parameters drawn from a range around their
defaults.

Every random draw is a pure function of an int64 key per example (``draw_keys``: seed, global
example index, step, checkpoint, sample), never of a process-wide generator, so crafting is the
same for any batch split and any number of processes.

``lowpass_direction`` keeps a step direction inside a space the squeezes keep: constant over BxB
pixel blocks (JPEG and blur remove high frequencies) and/or shared by the three colour channels
(grayscale keeps luma; JPEG quantizes chroma hardest and subsamples it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sep_hf import squeezes
from sep_hf.seeding import key_choice, key_normal_like, key_uniform

__all__ = ["VIEWS", "apply_views", "lowpass_direction", "parse_views"]


def _grouped(x: torch.Tensor, groups: torch.Tensor, options, function) -> torch.Tensor:
    """Apply ``function(x[rows], option)`` to the rows whose group is each option's index."""
    out = torch.empty_like(x)
    for index, option in enumerate(options):
        rows = (groups == index).nonzero().squeeze(1)
        if len(rows):
            out[rows] = function(x[rows], option)
    return out


# Parameter ranges around the matrix's defense columns (jpeg 10 and 50, blur 1, bit depth 4, RSE 0.2).
JPEG_QUALITIES = (10, 20, 30, 50)
BLUR_SIGMAS = (0.5, 1.0, 1.5)
BIT_DEPTHS = (3, 4, 5)
NOISE_STD_MAX = 0.2


def _jpeg(x, keys):
    return _grouped(x, key_choice(keys, 11, len(JPEG_QUALITIES)), JPEG_QUALITIES, squeezes.jpeg)


def _grayscale(x, keys):
    return squeezes.grayscale(x)


def _blur(x, keys):
    return _grouped(x, key_choice(keys, 13, len(BLUR_SIGMAS)), BLUR_SIGMAS, squeezes.gaussian_blur)


def _bitdepth(x, keys):
    return _grouped(x, key_choice(keys, 17, len(BIT_DEPTHS)), BIT_DEPTHS, squeezes.bit_depth)


def _noise(x, keys):
    std = (key_uniform(keys, 19) * NOISE_STD_MAX).view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return x + std * key_normal_like(x, keys, 23)


def _augment(x, keys):
    """The victims' own augmentation: random crop (4-pixel reflect padding) and horizontal flip."""
    flip = key_choice(keys, 29, 2).bool()
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    height, width = x.shape[-2:]
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = key_choice(keys, 31, 81)  # 9 x 9 crop positions
    return torch.stack([padded[i, :, dy:dy + height, dx:dx + width]
                        for i, (dy, dx) in enumerate(zip((offsets // 9).tolist(), (offsets % 9).tolist()))])


VIEWS = {
    "none": lambda x, keys: x,
    "jpeg": _jpeg,
    "grayscale": _grayscale,
    "blur": _blur,
    "bitdepth": _bitdepth,
    "noise": _noise,
    "augment": _augment,
}


def parse_views(text: str | None) -> tuple[str, ...]:
    """``"jpeg,grayscale,noise"`` -> ("jpeg", "grayscale", "noise"); empty or ``none`` -> ()."""
    names = tuple(name.strip() for name in (text or "").split(",") if name.strip() and name.strip() != "none")
    unknown = [name for name in names if name not in VIEWS]
    if unknown:
        raise ValueError(f"Unknown craft transform(s) {unknown}; choose from {', '.join(VIEWS)}.")
    return names


def apply_views(x: torch.Tensor, keys: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """Each example through one view drawn uniformly from ``names`` plus the identity (its key decides)."""
    if not names:
        return x
    options = ("none", *names)
    picks = key_choice(keys, 3, len(options))
    out = torch.empty_like(x)
    for index, name in enumerate(options):
        rows = (picks == index).nonzero().squeeze(1)
        if len(rows):
            out[rows] = VIEWS[name](x[rows], keys[rows])
    return out


def lowpass_direction(direction: torch.Tensor, block: int = 1, shared_channels: bool = False) -> torch.Tensor:
    """Project a step direction (N, C, H, W) onto block-constant (BxB) and/or channel-shared patterns."""
    if shared_channels and direction.shape[1] > 1:
        direction = direction.sum(1, keepdim=True).expand_as(direction)
    if block > 1:
        height, width = direction.shape[-2:]
        pooled = F.avg_pool2d(direction, block, ceil_mode=True)
        direction = pooled.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :height, :width]
    return direction.contiguous()
