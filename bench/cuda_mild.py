"""Is there a milder CUDA (PSNR >= 28 dB) to compose with SEP? CUDA's PSNR against its blur, measured.

    python bench/cuda_mild.py [--images 500]

CUDA (Sadasivan et al., CVPR 2023) filters each class with a 3x3 kernel whose weights are uniform in
[0, blur] plus one tap set to 1 (``sep_hf.protect.methods.cuda.cuda_filters``), then rescales by the
maximum. This bench applies it to the first ``--images`` CIFAR-10 training images at several blur
values, and the same with the unit tap forced to the centre (no shift: a class-wise blur only; not part
of CUDA), and reports the mean PSNR. No model is trained. Writes bench/results/cuda_mild.{json,md}.
"""

import argparse

import numpy as np
import torch
from common import SHARED_CIFAR10, markdown_table, write_results
from datasets import load_dataset

from sep_hf.protect.methods.cuda import apply_cuda, cuda_filters

BLURS = (0.3, 0.1, 0.05, 0.03, 0.0)
KEY = 123456789012  # a fixed public key: this measures PSNR, it protects nothing


def mean_psnr(images: torch.Tensor, protected: torch.Tensor) -> float:
    mse = (protected - images).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    args = parser.parse_args()
    split = load_dataset(args.dataset, split=f"train[:{args.images}]")
    images = torch.stack([torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
                          for image in split["img"]]).float() / 255
    labels = torch.tensor(split["label"])
    rows, record = [], {"images": len(images), "kernel_size": 3, "psnr_db": {}}
    for blur in BLURS:
        filters = cuda_filters(KEY, 10, 3, blur)
        centred = filters.clone().view(10, 1, 9)
        centred[centred == 1.0] = blur / 2  # the unit tap back to a blur weight ...
        centred[:, :, 4] = 1.0  # ... and the unit at the centre
        cuda, centre = (mean_psnr(images, apply_cuda(images, labels, f.view(10, 1, 3, 3))) for f in (filters, centred))
        record["psnr_db"][str(blur)] = {"cuda": cuda, "centred_tap": centre}
        rows.append([blur, f"{cuda:.1f}", f"{centre:.1f}"])
    write_results("cuda_mild", record, markdown_table(["blur", "CUDA PSNR dB", "centred unit tap PSNR dB"], rows))


if __name__ == "__main__":
    main()
