"""Class-wise pixel shortcuts: one saturated pixel per class, a component adversarial training cannot cancel.

Measured here, it does not help: at cpu scale the PGD-4 and RSE victims ignore it (bench/pixel_pilot.py,
docs/results.md), so sep-robust keeps it off by default; standard training takes it completely.

One-Pixel Shortcut (OPS; Wu et al., "One-Pixel Shortcut: on the Learning Preference of Deep Neural
Networks", ICLR 2023) sets, in every image of a class, one pixel at one position to one corner of the
RGB cube; a victim learns that pixel instead of the images (ResNet-18 on CIFAR-10: 10.6% test accuracy
even under adversarial training at 8/255, which cannot move a pixel by more than its radius). Its L-inf
is up to 255/255 and its L2 tiny: one pixel of 1,024 at 32x32, about 1 dB of PSNR.

Differences from the paper (ours): the position and colour are not searched on the images but drawn
from the protector's private seed (no pass over the data; nothing about the images is published
through the choice), the colours are the six saturated corners (natural images rarely hold them;
black and white they often do), positions stay 4 cells inside the border (a victim's random crop with
4 pixels of padding never cuts them off), two classes of one colour are at least 12 cells apart (the
crop moves both by up to 4). Positions live on a 32x32 grid over the image: at H x W each "pixel" is
a block of about H/32 x W/32 pixels, so a victim that resizes a photo to 32x32 still sees one pixel.
"""

from __future__ import annotations

import torch

__all__ = ["GRID", "SATURATED", "MAX_CLASSES", "pixel_signatures", "class_pixels"]

GRID = 32
SATURATED = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0))
BORDER = 4
SAME_COLOUR_DISTANCE = 12
MAX_CLASSES = 12  # two classes per colour: the second always fits 12 cells from the first
_SALT = 0x0F5


def pixel_signatures(num_classes: int, seed: int) -> list[tuple[int, int, tuple[int, int, int]]]:
    """One (row, col, RGB colour) per class: row and col in cells of the GRID x GRID grid, colour in 0..255.

    A seeded draw (``seed`` is the protection's private seed): positions distinct and BORDER cells
    inside the edge, two classes of one colour at least SAME_COLOUR_DISTANCE cells apart (Chebyshev).
    Raises ValueError for more than MAX_CLASSES (12) classes.
    """
    if num_classes > MAX_CLASSES:
        raise ValueError(f"Pixel shortcuts have room for {MAX_CLASSES} classes; the dataset has {num_classes}.")
    generator = torch.Generator().manual_seed((seed ^ _SALT) & ((1 << 62) - 1))
    colours = [SATURATED[i] for i in torch.randperm(len(SATURATED), generator=generator).tolist()]
    span = GRID - 2 * BORDER
    chosen: list[tuple[int, int, tuple[int, int, int]]] = []
    for label in range(num_classes):
        rgb = colours[label % len(colours)]  # each colour serves every sixth class
        while True:  # terminates: a same-coloured class leaves a corner 12 cells away free
            row, col = (BORDER + torch.randint(span, (2,), generator=generator)).tolist()
            if all(max(abs(row - r), abs(col - c)) >= (SAME_COLOUR_DISTANCE if rgb == other else 1)
                   for r, c, other in chosen):
                chosen.append((row, col, rgb))
                break
    return chosen


def class_pixels(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                 sizes: torch.Tensor | None = None) -> torch.Tensor:
    """``images`` (N, C, H, W) in [0, 1] with each image's class pixel set: a copy, same shape and dtype.

    ``labels`` (N,) integer classes; ``sizes`` (N, 2) the real (height, width) of each image when a
    batch is padded to H x W (default: all H x W). The grid cell (row, col) of an h x w image is the
    block of rows h*row/32 .. h*(row+1)/32 (at least one pixel), columns likewise. C = 3 gets the RGB
    colour; C = 1 gets white for the classes whose colour has two 255 channels, black otherwise.
    """
    out = images.clone()
    signatures = pixel_signatures(num_classes, seed)
    if sizes is None:
        sizes = torch.tensor(images.shape[-2:]).expand(len(images), 2)
    groups = torch.cat([labels.view(-1, 1).cpu(), sizes.cpu()], dim=1)
    for label, height, width in groups.unique(dim=0).tolist():  # one block per (class, size), not per image
        members = (groups == torch.tensor([label, height, width])).all(1).nonzero().flatten().to(images.device)
        row, col, rgb = signatures[label]
        colour = torch.tensor(rgb if images.shape[1] == 3 else [255 * (sum(rgb) > 255)], dtype=images.dtype)
        top, left = height * row // GRID, width * col // GRID
        bottom, right = max(height * (row + 1) // GRID, top + 1), max(width * (col + 1) // GRID, left + 1)
        out[members, :, top:bottom, left:right] = (colour / 255).view(1, -1, 1, 1).to(images.device)
    return out
