"""Pilot: a one-pixel shortcut (OPS) on top of the shipped sep-robust images, post hoc.

    python bench/robust_protection.py --candidates eot-grating10 --defenses none   # first: its crafted images
    python bench/pixel_pilot.py --base eot-grating10 --defenses none at median rse jpeg

Issue 25's moonshot needs a component adversarial training cannot cancel: the AT-4 cell sits at
AT's own cost with or without the grating. One-Pixel Shortcut (Wu et al., ICLR 2023) sets one pixel
per class, at one position, to one corner of the RGB cube in every image of the class: its L-inf
(up to 255/255) is far above AT's radius and its L2 tiny (about 0.7 dB at 32x32). The position and
colour per class are searched on the clean images (our own search, after the paper's criterion: the
(position, colour) whose distance to the class's pixels there is large and stable: mean over std,
each position used by one class only). Written under bench/runs/pixel-{base}/, victims
victim-robust-pixel-{base}-...; bench/results/pixel_pilot.{json,md}.
"""

import argparse
import json
import shutil

import protection_matrix as matrix
import torch
from common import RESULTS_DIR, SHARED_CIFAR10, markdown_table, read_json, write_results
from datasets import Dataset, Image, load_dataset
from grating_pilot import to_tensor

from sep_hf.data.load import load_image_dataset

SAME_COLOUR_DISTANCE = 12
COLOURS = torch.tensor([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=torch.float32)


def search_pixels(clean: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[tuple[int, int, list[int]]]:
    """Per class (row, col, colour): ``clean`` (N, 3, H, W) uint8. The position and RGB corner whose mean
    distance to the class's own pixels, over its standard deviation, is largest; positions not shared, and
    two classes of one colour at least SAME_COLOUR_DISTANCE pixels apart (a victim's crop moves them 4)."""
    height, width = clean.shape[-2:]
    flat = clean.float().flatten(2)  # (N, 3, H*W)
    scores = torch.empty(num_classes, len(COLOURS), height * width)
    for label in range(num_classes):
        members = flat[labels == label]
        for index, colour in enumerate(COLOURS):
            distance = (members - colour.view(1, 3, 1)).abs().mean(1) / 255  # (n, H*W)
            scores[label, index] = distance.mean(0) / distance.std(0).clamp_min(1e-3)
    chosen = {}
    best, order = scores.flatten(1).sort(dim=1, descending=True)
    for label in best[:, 0].argsort(descending=True).tolist():  # the most separable class chooses first
        for flat_index in order[label].tolist():
            colour, position = divmod(flat_index, height * width)
            row, col, rgb = position // width, position % width, COLOURS[colour].int().tolist()
            if all(max(abs(row - r), abs(col - c)) >= (SAME_COLOUR_DISTANCE if rgb == other else 1)
                   for r, c, other in chosen.values()):
                chosen[label] = (row, col, rgb)
                break
    return [chosen[label] for label in range(num_classes)]


def build(base: str, clean_path: str) -> tuple[str, dict]:
    out = matrix.RUNS_DIR / f"pixel-{base}"
    dataset_dir = out / "dataset"
    if (out / "stats.json").exists():
        return str(dataset_dir), read_json(out / "stats.json")
    crafted = str(matrix.RUNS_DIR / f"protect-robust-{base}-eps8" / "dataset")
    protected = load_image_dataset(crafted).split("train")  # not load_dataset(folder): its cache is keyed on the card
    clean = load_dataset(clean_path, split=f"train[:{len(protected)}]")
    assert protected["label"] == clean["label"], "the crafted images are not the first rows of the clean split"
    x, x0 = to_tensor(protected["img"]).float(), to_tensor(clean["img"]).float()
    labels = torch.tensor(protected["label"])
    pixels = search_pixels(x0, labels, int(labels.max()) + 1)
    y = x.clone()
    for label, (row, col, colour) in enumerate(pixels):
        y[labels == label, :, row, col] = torch.tensor(colour, dtype=torch.float32)
    mse = lambda a: (a - x0).pow(2).flatten(1).mean(1).clamp_min(1e-6)  # noqa: E731
    psnr = lambda a: float((10 * torch.log10(255**2 / mse(a))).mean())  # noqa: E731
    stats = {"base": base, "pixels": pixels, "mean_psnr": psnr(y), "base_mean_psnr": psnr(x),
             "max_linf": int((y - x0).abs().max()), "crafted_from": crafted}
    images = [y_.permute(1, 2, 0).to(torch.uint8).numpy() for y_ in y]
    table = Dataset.from_dict({"img": images, "label": protected["label"]}).cast_column("img", Image())
    table = table.cast_column("label", protected.features["label"])
    (dataset_dir / "data").mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(dataset_dir / "data" / "train-00000-of-00001.parquet"))
    shutil.copy(f"{crafted}/README.md", dataset_dir / "README.md")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return str(dataset_dir), stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="eot-grating10", help="A bench/robust_protection.py candidate, crafted.")
    parser.add_argument("--defenses", nargs="+", default=["none", "at"])
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    args = parser.parse_args()
    args.eps, args.model, args.report_only = 8.0, "smallnet_cifar", False
    for flag in ("max_train_samples", "max_eval_samples", "epochs"):
        setattr(args, flag, None)
    path = RESULTS_DIR / "pixel_pilot.json"
    record = read_json(path) if path.exists() else {"runs": {}}
    dataset, stats = build(args.base, args.dataset)
    entry = record["runs"].setdefault(args.base, {**stats, "cells": {}})
    for column in args.defenses:
        cell = matrix.victim("sep-robust", dataset, args.dataset, column, args, data_name=f"robust-pixel-{args.base}")
        entry["cells"][column] = cell["eval_accuracy"]
        write(record)
    write(record)


def write(record: dict) -> None:
    columns = sorted({c for entry in record["runs"].values() for c in entry["cells"]})
    rows = [[name, f"{e['base_mean_psnr']:.1f} -> {e['mean_psnr']:.1f}", e["max_linf"],
             *(f"{e['cells'][c]:.4f}" if c in e["cells"] else "-" for c in columns)] for name, e in record["runs"].items()]
    write_results("pixel_pilot", record, markdown_table(["base candidate", "PSNR dB", "max Linf", *columns], rows))


if __name__ == "__main__":
    main()
