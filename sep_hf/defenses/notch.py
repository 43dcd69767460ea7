"""Train on images with the grating family's frequencies notched out: the adaptive answer to sep-robust's gratings.

``sep-robust --grating_amplitude`` adds one luma grating per class (``sep_hf.gratings``: 12
published signatures, orientations x periods of 8-16 pixels; only which class gets which, and the
phases, come from the protector's private seed). An appropriator who knows the method but not the
seed zeroes, in every training image and channel, the 2-D FFT bins where any signature puts its
energy (``signature_frequencies``), dilated by ``--notch_radius`` bins. This also removes the images'
own content at those low frequencies; the clean cell of the column measures that cost. With
``--notch_jpeg_quality 10`` the images are JPEG-recompressed first (ISS), which removes most of the
L-inf part as well: the appropriator's answer to a grating plus SEP.

Finding the gratings without knowing the family does not work at the amplitudes sep-robust uses:
on 5,000 CIFAR-10 images with 10/255 gratings, the largest ratio of one class's median power to the
median class's at any frequency is 4.4, against 3.2 on clean images (class-specific natural spectra);
so the family is notched as a whole. Not from a paper: the adaptive column for our own component.
Training images only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sep_hf.defenses import register_defense
from sep_hf.defenses.base import Defense
from sep_hf.gratings import signature_frequencies
from sep_hf.squeezes import jpeg

__all__ = ["NotchArguments", "SpectralNotch", "notch_frequencies"]


@dataclass
class NotchArguments:
    """Flags of ``--defense notch``."""

    notch_radius: int = field(default=1, metadata={"help": "--defense notch: FFT bins notched around each grating frequency (0: the nearest bins only)."})
    notch_jpeg_quality: int = field(default=0, metadata={"help": "--defense notch: JPEG-recompress at this quality first (0: no), to remove sep-robust's L-inf part as well."})

    def __post_init__(self):
        if not 0 <= self.notch_radius <= 4:
            raise ValueError(f"--notch_radius must be in 0..4, got {self.notch_radius}.")
        if not 0 <= self.notch_jpeg_quality <= 95:
            raise ValueError(f"--notch_jpeg_quality must be in 1..95 (0: no JPEG), got {self.notch_jpeg_quality}.")


def notch_frequencies(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W) uint8 with the 2-D FFT bins of ``mask`` (H, W) zeroed; uint8, same shape."""
    spectrum = torch.fft.fft2(images.float())
    spectrum[..., mask] = 0
    return torch.fft.ifft2(spectrum).real.round().clamp(0, 255).to(images.dtype)


@register_defense("notch")
class SpectralNotch(Defense):
    """``--defense notch``: every grating frequency sep-robust can use zeroed in the training images."""

    arguments = NotchArguments

    def mask(self, shape) -> torch.Tensor:
        return signature_frequencies(tuple(shape), radius=self.settings.notch_radius)

    def prepare_training_images(self, images):
        if self.settings.notch_jpeg_quality:
            images = jpeg(images, self.settings.notch_jpeg_quality)
        return notch_frequencies(images, self.mask(images.shape[-2:]))

    def describe(self) -> dict:
        return {"radius": self.settings.notch_radius, "jpeg_quality_first": self.settings.notch_jpeg_quality or None,
                "frequencies": "sep_hf.gratings.SIGNATURES", "applied_to": "training images, once before training"}
