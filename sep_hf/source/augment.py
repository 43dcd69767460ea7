"""Batched crop-and-flip augmentation on whole tensors, and the normalization statistics of a dataset.

``draw_crop_flip`` draws the parameters of a batch from a ``torch.Generator`` (so every process draws
the same ones) and ``apply_crop_flip`` applies them to any rows, which is how a batch decoded on
demand gets exactly the augmentation a batch held in memory would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_stats(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units (``ImageRows``: streamed)."""
    if isinstance(images, torch.Tensor):
        pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
        return pixels.mean(1).tolist(), pixels.std(1).tolist()
    total = total_sq = count = 0
    for start in range(0, len(images), 1000):
        chunk = images[start : start + 1000].transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
        total, total_sq, count = total + chunk.sum(1), total_sq + chunk.pow(2).sum(1), count + chunk.shape[1]
    mean = total / count
    return mean.tolist(), ((total_sq - count * mean.pow(2)) / (count - 1)).clamp_min(0).sqrt().tolist()


def draw_crop_flip(n: int, padding: int, flip: bool, generator: torch.Generator) -> dict:
    """The random choices of ``augment_crop_flip`` for n images (flip mask, crop offsets), drawn in its order."""
    params = {"padding": padding, "flip": torch.rand(n, generator=generator) < 0.5 if flip else None}
    if padding > 0:
        params["dy"] = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        params["dx"] = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return params


def apply_crop_flip(images: torch.Tensor, params: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Apply drawn choices (``draw_crop_flip``) to a batch; ``rows`` picks the batch's entries of them."""
    pick = (lambda value: value) if rows is None else (lambda value: value[rows.cpu()])
    n, _, height, width = images.shape
    padding = params["padding"]
    if params["flip"] is not None:
        images = torch.where(pick(params["flip"]).view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    if padding > 0:
        padded = F.pad(images.float() if images.dtype == torch.uint8 else images, (padding,) * 4, mode="reflect")
        padded = padded.to(images.dtype)
        dy, dx = pick(params["dy"]).to(images.device), pick(params["dx"]).to(images.device)
        rows_ = (dy.view(-1, 1) + torch.arange(height, device=images.device)).view(n, 1, height, 1)
        cols = (dx.view(-1, 1) + torch.arange(width, device=images.device)).view(n, 1, 1, width)
        batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
        channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        images = padded[batch, channel, rows_, cols]
    return images


def augment_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (reflect padding) and horizontal flip of a whole batch, without a Python loop."""
    return apply_crop_flip(images, draw_crop_flip(len(images), padding, flip, generator))


