"""Does a protector control JPEG's grid? The premise of crafting in JPEG's own quantization space, measured.

    python bench/jpeg_grid.py [--images 1000] [--eps 8]

JPEG quantizes each 8x8 block's luma DC coefficient, DC = 8 (mean - 128), in steps Q (80 at quality
10, libjpeg's table 16 scaled by 5000 / quality). A block-constant luma shift s (the same s on R, G
and B: Y moves by s, Cb and Cr do not) moves DC by 8 s, up to 64 at 8/255, against a half-step of 40:
so, for most blocks, the protector can choose which neighbouring level the appropriator's encoder
lands on, and a change of at most 8/255 becomes a decoded change of Q / 8 = 10 levels.

For the first ``--images`` CIFAR-10 training images this bench computes, per block, the smallest
shift |s| <= eps (clipping at 0 and 255 included) that moves the quantized DC one level up, and one
level down; then applies the "up" shifts, encodes with PIL's libjpeg (4:2:0, as the jpeg defense) at
qualities 8, 10, 15 and 50, decodes, and measures how many pushed blocks really moved a level up, how
far their decoded mean moved, and the PSNR cost. It measures the premise, not a protection: no model
is trained. Writes bench/results/jpeg_grid.{json,md}.
"""

import argparse
import io

import numpy as np
import torch
from common import SHARED_CIFAR10, markdown_table, write_results
from datasets import load_dataset
from PIL import Image

from sep_hf.protect.methods.sep import luma_dc_step  # the step the sep-robust --jpeg_grid_quality flag uses

QUALITIES = (8, 10, 15, 50)


def luma(rgb: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 or float -> Y as libjpeg computes it (ITU-R 601, float)."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def block_means(y: np.ndarray) -> np.ndarray:
    n, h, w = y.shape
    return y.reshape(n, h // 8, 8, w // 8, 8).mean(axis=(2, 4))


def shifted(rgb: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``rgb`` (N, H, W, 3) uint8 with a per-block integer shift (N, H/8, W/8) on all channels, clipped."""
    per_pixel = shift.repeat(8, axis=1).repeat(8, axis=2)[..., None]
    return np.clip(rgb.astype(np.int16) + per_pixel, 0, 255).astype(np.uint8)


def smallest_shifts(rgb: np.ndarray, step: int, eps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the smallest shift in 1..eps (up) and -1..-eps (down) that changes the quantized DC by
    one level with the real clipping; 0 where none does."""
    level = np.rint(8 * (block_means(luma(rgb.astype(np.float64))) - 128) / step)
    found = {}
    for sign in (1, -1):
        best = np.zeros(level.shape, dtype=np.int16)
        for magnitude in range(eps, 0, -1):  # descending: the smallest that works is written last
            moved = np.rint(8 * (block_means(luma(shifted(rgb, np.full(level.shape, sign * magnitude)).astype(np.float64)))
                                 - 128) / step)
            best = np.where(moved == level + sign, sign * magnitude, best)
        found[sign] = best
    return found[1], found[-1]


def shared_up_shift(rgb: np.ndarray, qualities: tuple, eps: int) -> np.ndarray:
    """Per block, the smallest shift in 1..eps that moves the DC level up at EVERY one of ``qualities``."""
    means = {m: block_means(luma(shifted(rgb, np.full((len(rgb), rgb.shape[1] // 8, rgb.shape[2] // 8), m))
                                 .astype(np.float64))) for m in range(eps + 1)}
    best = np.zeros(means[0].shape, dtype=np.int16)
    for magnitude in range(eps, 0, -1):
        works = np.ones(means[0].shape, dtype=bool)
        for quality in qualities:
            step = luma_dc_step(quality)
            works &= np.rint(8 * (means[magnitude] - 128) / step) == np.rint(8 * (means[0] - 128) / step) + 1
        best = np.where(works, magnitude, best)
    return best


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    out = []
    for image in rgb:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(np.array(Image.open(buffer).convert("RGB")))
    return np.stack(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--eps", type=int, default=8, help="Budget in 1/255 levels.")
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    args = parser.parse_args()
    split = load_dataset(args.dataset, split=f"train[:{args.images}]")
    rgb = np.stack([np.array(image.convert("RGB")) for image in split["img"]])
    step = luma_dc_step(10)
    up, down = smallest_shifts(rgb, step, args.eps)
    pushed = up != 0
    protected = shifted(rgb, up)
    record = {"images": len(rgb), "blocks": int(up.size), "eps_levels": args.eps, "crafted_for_quality": 10,
              "luma_dc_step_q10": step, "share_up_reachable": float(pushed.mean()),
              "share_down_reachable": float((down != 0).mean()),
              "share_either_reachable": float(((up != 0) | (down != 0)).mean()),
              "mean_abs_shift_levels": float(np.abs(up[pushed]).mean()), "psnr_db": psnr(protected, rgb),
              "qualities": {}}
    common_up = shared_up_shift(rgb, (8, 10, 15), args.eps)
    record["share_up_reachable_at_8_10_15_at_once"] = float((common_up != 0).mean())
    rows = []
    for quality in QUALITIES:
        clean_means = block_means(luma(jpeg_roundtrip(rgb, quality).astype(np.float64)))
        protected_means = block_means(luma(jpeg_roundtrip(protected, quality).astype(np.float64)))
        change = (protected_means - clean_means)[pushed]
        q_step = luma_dc_step(quality)
        moved_up = float((change >= q_step / 16).mean())  # half a decoded level (Q / 8) or more
        record["qualities"][quality] = {"luma_dc_step": q_step, "share_pushed_blocks_moved_up": moved_up,
                                        "mean_decoded_change_levels": float(change.mean()),
                                        "mean_input_change_levels": float(np.abs(up[pushed]).mean())}
        rows.append([quality, q_step, f"{moved_up:.1%}", f"{change.mean():+.2f}", f"{q_step / 8:.1f}"])
    table = markdown_table(["JPEG quality", "luma DC step Q", "pushed blocks moved a level up",
                            "decoded block-mean change (levels)", "one level = Q/8"], rows)
    summary = (f"{record['images']} images, {record['blocks']} blocks; within {args.eps}/255 a block-constant luma shift "
               f"moves the q10 DC level up in {record['share_up_reachable']:.1%} of blocks, down in "
               f"{record['share_down_reachable']:.1%}, one or the other in {record['share_either_reachable']:.1%} "
               f"(mean |shift| {record['mean_abs_shift_levels']:.2f} levels; PSNR {record['psnr_db']:.1f} dB with every "
               f"reachable block pushed up). One shift that moves the level up at qualities 8, 10 and 15 at once "
               f"exists in {record['share_up_reachable_at_8_10_15_at_once']:.1%} of blocks. Crafted for quality 10:")
    write_results("jpeg_grid", record, summary + "\n\n" + table)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
