"""Image squeezes an appropriator applies before training (and a protection may craft through).

Plain functions on batches (N, C, H, W). Each works on ``uint8`` (exactly what the victim defense
trains on) and, where a differentiable version exists, on float pixels in [0, 1] with gradients:

| squeeze | uint8 (exact) | float, differentiable |
|---|---|---|
| ``jpeg`` | PIL's libjpeg, 4:2:0 (ISS's setting) | YCbCr, 4:2:0, 8x8 DCT, straight-through quantization |
| ``grayscale`` | ITU-R 601-2 luma exactly as PIL's ``convert("L")`` (``luma``) | the same weights, no rounding |
| ``bit_depth`` | keep the top ``bits`` bits | straight-through rounding |
| ``gaussian_blur`` | rounded | the same convolution |
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["jpeg", "grayscale", "luma", "bit_depth", "gaussian_blur", "LUMA_WEIGHTS"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses
_CHUNK = 4096  # images per batched op in the one-off transforms: bounded memory at any size


def _chunked(images: torch.Tensor, function) -> torch.Tensor:
    """Apply ``function`` to slices of at most ``_CHUNK`` images (memory stays bounded)."""
    return torch.cat([function(images[start : start + _CHUNK]) for start in range(0, len(images), _CHUNK)]) \
        if len(images) else images.clone()


def _require_uint8(images: torch.Tensor, what: str) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(f"{what} of float pixels has no differentiable version here; pass uint8 images.")


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG encode/decode every image (N, C, H, W) at ``quality`` (4:2:0 chroma).

    uint8: PIL's libjpeg, one image per call (a defense runs it once per training image, before
    training). float in [0, 1]: the differentiable approximation (``_jpeg_float``) for crafting.
    """

    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {channels}.")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}.")
    if images.dtype != torch.uint8:
        return _jpeg_float(images, quality)
    mode = "L" if channels == 1 else "RGB"

    def code(chunk: torch.Tensor) -> torch.Tensor:
        decoded = []
        for array in chunk.permute(0, 2, 3, 1).contiguous().numpy():
            buffer = io.BytesIO()
            Image.fromarray(array[..., 0] if channels == 1 else array).save(buffer, format="JPEG", quality=quality,
                                                                          subsampling=2)
            decoded.append(np.array(Image.open(io.BytesIO(buffer.getvalue())).convert(mode)))
        stacked = torch.from_numpy(np.stack(decoded))
        return stacked.unsqueeze(1) if channels == 1 else stacked.permute(0, 3, 1, 2)

    return _chunked(images, code)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> uint8 L (N, 1, H, W) exactly as PIL's ``convert("L")``: ITU-R 601-2
    weights in 16-bit fixed point, rounded. The one grayscale formula of the package: the data path
    (an RGB dataset published as L) and the grayscale defense both use it."""
    r, g, b = rgb.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """RGB -> luma repeated on 3 channels (the model's input shape is kept); uint8 as PIL, float exact.

    One-channel (L) images are grey already and come back unchanged. Raises ValueError for other
    channel counts.
    """
    if images.shape[1] == 1:
        return images.clone() if images.dtype == torch.uint8 else images
    if images.shape[1] != 3:
        raise ValueError(f"Grayscale expects RGB (3 channels) or L (1 channel) images, got {images.shape[1]}.")
    if images.dtype == torch.uint8:
        return _chunked(images, lambda chunk: luma(chunk).expand(-1, 3, -1, -1))
    weights = torch.tensor(LUMA_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True).expand(-1, 3, -1, -1)


def bit_depth(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep ``bits`` bits per channel (ISS's third squeeze): at most 2**bits distinct levels.

    uint8: the level's top bits, re-centred in their bin so the mean brightness is kept. float:
    the same levels with a straight-through gradient (identity backward).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}.")
    width = 256 // 2**bits
    if images.dtype == torch.uint8:
        if bits == 8:
            return images.clone()
        return ((images // width) * width + width // 2).to(torch.uint8)
    levels = torch.round(images.detach().clamp(0, 1) * 255)  # the uint8 levels the float pixels stand for
    squeezed = (torch.div(levels, width, rounding_mode="floor") * width + width // 2) / 255 if bits < 8 else levels / 255
    return images + (squeezed - images).detach()


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass (reflect padding, radius 3 sigma); uint8 in, rounded uint8 out."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}.")

    def blur(chunk: torch.Tensor) -> torch.Tensor:
        x = chunk.float() if chunk.dtype == torch.uint8 else chunk
        kernel = _gaussian_kernel(sigma, x.device, x.dtype)
        channels, radius = x.shape[1], len(kernel) // 2
        x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        x = F.pad(x, (0, 0, radius, radius), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
        return x.round().clamp(0, 255).to(torch.uint8) if chunk.dtype == torch.uint8 else x

    return _chunked(images, blur) if images.dtype == torch.uint8 else blur(images)


# ----------------------------------------------------------------------------------------------
# Differentiable JPEG (float pixels): the codec's lossy steps with a straight-through rounding

# IJG's base quantization tables (ITU-T T.81 Annex K), the ones libjpeg scales by quality.
_LUMA_TABLE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
               14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
               49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA_TABLE = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
                 47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))


def _quant_table(base: tuple, quality: int, device) -> torch.Tensor:
    """libjpeg's quality scaling (jcparam.c): 5000/q below 50, 200 - 2q above; entries in [1, 255]."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float32, device=device).mul(scale).add(50).div(100).floor().clamp(1, 255)
    return table.view(8, 8)


def _dct_matrix(device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II: coefficients = D @ block @ D.T (JPEG's transform, up to its 1/4 scale)."""
    k = torch.arange(8, device=device, dtype=torch.float32)
    matrix = torch.cos((2 * k.view(1, -1) + 1) * k.view(-1, 1) * torch.pi / 16) * (2 / 8) ** 0.5
    matrix[0] /= 2**0.5
    return matrix


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounding forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _quantize_blocks(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT each 8x8 block of (N, H, W) samples centred on 0, quantize with ``table``, and transform back."""
    n, height, width = plane.shape
    blocks = plane.view(n, height // 8, 8, width // 8, 8).transpose(2, 3)
    dct = _dct_matrix(plane.device)
    coefficients = dct @ blocks @ dct.T
    restored = dct.T @ (_round_ste(coefficients / table) * table) @ dct
    return restored.transpose(2, 3).reshape(n, height, width)


def _jpeg_float(images: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG's lossy path on float pixels: YCbCr, 4:2:0 chroma, 8x8 DCT, quantization (straight-through), back.

    Differs from libjpeg in its entropy-free details only: bilinear chroma upsampling instead of
    libjpeg's fancy upsampling, and no integer rounding between the stages.
    """
    n, channels, height, width = images.shape
    pad_h, pad_w = -height % 16, -width % 16
    x = F.pad(images * 255, (0, pad_w, 0, pad_h), mode="replicate")
    luma_table = _quant_table(_LUMA_TABLE, quality, x.device)
    if channels == 1:
        y = _quantize_blocks(x[:, 0] - 128, luma_table) + 128
        return (y.unsqueeze(1)[..., :height, :width] / 255).clamp(0, 1)
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    y = _quantize_blocks(y - 128, luma_table) + 128
    chroma_table = _quant_table(_CHROMA_TABLE, quality, x.device)
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # 4:2:0
    chroma = torch.stack([_quantize_blocks(plane, chroma_table) for plane in chroma.unbind(1)], 1)
    cb, cr = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (rgb[..., :height, :width] / 255).clamp(0, 1)
