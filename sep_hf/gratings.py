"""Class-wise luma gratings: a shortcut component whose L-inf exceeds adversarial training's radius.

An L-inf perturbation at 8/255 is cancelled by adversarial training at that radius and mostly removed
by JPEG-10 (bench/results/robust_protection.md). A grating is the opposite trade: a sinusoid of a few
levels' amplitude, the same on R, G and B (luma: grayscale keeps it), at periods of 8-16 pixels (the
lowest AC coefficients of JPEG's 8x8 blocks, which quality 10 quantizes in steps a 10/255 grating
crosses), and stationary (random crop and flip only change its phase, so a convolution learns it
anywhere). Each class gets one signature (orientation x period); each image a random phase, drawn
from its global index and the seed, so no single template can be subtracted. Its L2 cost is small for
its L-inf: RMS = amplitude / sqrt(2) for stripes, amplitude / 2 for plaids.

Not from a paper: the class-wise, model-free idea is that of synthetic-noise shortcuts (Yu et al.,
"Availability Attacks Create Shortcuts", KDD 2022) and CUDA (Sadasivan et al., CVPR 2023); the choice
of a stationary luma grating above the AT radius is ours (bench/robust_protection.py measures it).
"""

from __future__ import annotations

import math

import torch

from sep_hf.seeding import draw_keys, key_uniform

__all__ = ["SIGNATURES", "grating_signatures", "class_gratings", "signature_frequencies"]

# Orientations whose set is unchanged by a horizontal flip (the flip only moves the phase):
# horizontal stripes, vertical stripes, the +-45 degree plaid, the horizontal + vertical plaid.
ORIENTATIONS = {"horizontal": ((0.0, 1.0),), "vertical": ((1.0, 0.0),),
                "diagonal": ((1.0, 1.0), (1.0, -1.0)), "cross": ((1.0, 0.0), (0.0, 1.0))}
PERIODS = (8.0, 12.0, 16.0)
SIGNATURES = [(orientation, period) for period in PERIODS for orientation in ORIENTATIONS]
_PHASE_SALT = 0x6A71


def grating_signatures(num_classes: int, seed: int) -> list[tuple[str, float]]:
    """One (orientation, period in pixels) per class, a seeded permutation of ``SIGNATURES``.

    Raises ValueError for more classes than signatures (12).
    """
    if num_classes > len(SIGNATURES):
        raise ValueError(f"Class-wise gratings have {len(SIGNATURES)} signatures; the dataset has {num_classes} classes.")
    order = torch.randperm(len(SIGNATURES), generator=torch.Generator().manual_seed(seed & ((1 << 62) - 1)))
    return [SIGNATURES[i] for i in order[:num_classes].tolist()]


def class_gratings(labels: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], num_classes: int,
                   seed: int) -> torch.Tensor:
    """(N, 1, H, W) gratings in [-1, 1] (peak 1): image i gets its class's signature at a random phase.

    ``labels`` and ``indices`` (global example indices, for the phase) are (N,) integer tensors;
    ``shape`` is (H, W) in pixels. Periods are in pixels of the published image: measured on 32x32
    CIFAR-10 only; a victim that downsizes large photos by more than 2x sees them aliased.
    """
    height, width = shape
    signatures = grating_signatures(num_classes, seed)
    rows = torch.arange(height, dtype=torch.float32).view(1, -1, 1)
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, -1)
    keys = draw_keys(indices.cpu(), seed, _PHASE_SALT)
    out = torch.zeros(len(labels), 1, height, width)
    for label in labels.unique().tolist():
        members = (labels.cpu() == label).nonzero().flatten()
        orientation, period = signatures[label]
        waves = ORIENTATIONS[orientation]
        total = torch.zeros(len(members), height, width)
        for component, (dx, dy) in enumerate(waves):
            phase = 2 * math.pi * key_uniform(keys[members], component).view(-1, 1, 1)
            frequency = 2 * math.pi / period / math.hypot(dx, dy)
            total += torch.cos(frequency * (dx * cols + dy * rows) + phase)
        out[members, 0] = total / len(waves)
    return out.to(labels.device)


def signature_frequencies(shape: tuple[int, int], signatures=None, radius: int = 0) -> torch.Tensor:
    """(H, W) boolean mask over ``torch.fft.fft2`` bins: where gratings of ``signatures`` (default: every
    signature) put their energy at image size ``shape``, i.e. the bins around each wave's frequency
    and its mirror (off-grid periods spread over the neighbouring bins), dilated by ``radius`` bins.
    """
    height, width = shape
    mask = torch.zeros(height, width, dtype=torch.bool)
    for orientation, period in signatures or SIGNATURES:
        for dx, dy in ORIENTATIONS[orientation]:
            norm = math.hypot(dx, dy)
            fy, fx = height * dy / (period * norm), width * dx / (period * norm)  # cycles per image
            for sign in (1, -1):
                for row in range(math.floor(sign * fy) - radius, math.ceil(sign * fy) + radius + 1):
                    for col in range(math.floor(sign * fx) - radius, math.ceil(sign * fx) + radius + 1):
                        mask[row % height, col % width] = True
    mask[0, 0] = False  # the image's mean is never a grating's
    return mask
