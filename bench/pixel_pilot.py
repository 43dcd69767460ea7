"""Pilot: a one-pixel shortcut (OPS) on top of the shipped sep-robust images, post hoc.

    python bench/robust_protection.py --candidates eot-grating10 --defenses none   # first: its crafted images
    python bench/pixel_pilot.py --base eot-grating10 --defenses none at median rse jpeg

Issue 25's moonshot needs a component adversarial training cannot cancel: the AT-4 cell sits at
AT's own cost with or without the grating. One-Pixel Shortcut (Wu et al., ICLR 2023) sets one pixel
per class, at one position, to one corner of the RGB cube in every image of the class: its L-inf
(up to 255/255) is far above AT's radius and its L2 tiny (about 1 dB at 32x32). Positions and
colours come from the seed, not from a search on the images (``sep_hf.pixel_shortcuts``: what
sep-robust would ship; the paper searches them). Written under bench/runs/pixel-{base}/, victims
victim-robust-pixel-{base}-...; bench/results/pixel_pilot.{json,md}, with each victim's reliance on the
pixels (its accuracy on clean test images carrying their own class's pixel, or the next class's).
"""

import argparse

import protection_matrix as matrix
import torch
from common import RESULTS_DIR, SHARED_CIFAR10, markdown_table, read_json, write_results
from datasets import load_dataset
from grating_pilot import load_crafted, matrix_protocol, mean_psnr, save_folder, to_tensor

from sep_hf.pixel_shortcuts import class_pixels, pixel_signatures

SEED = 0  # the bench's --protection_seed


def build(base: str, clean_path: str) -> tuple[str, dict]:
    out = matrix.RUNS_DIR / f"pixel-{base}"
    if (out / "stats.json").exists():
        return str(out / "dataset"), read_json(out / "stats.json")
    crafted = str(matrix.RUNS_DIR / f"protect-robust-{base}-eps8" / "dataset")
    protected, x, x0, labels = load_crafted(crafted, clean_path)
    num_classes = int(labels.max()) + 1
    y = class_pixels(x / 255, labels, num_classes, SEED) * 255
    stats = {"base": base, "pixels": pixel_signatures(num_classes, SEED), "mean_psnr": mean_psnr(y, x0),
             "base_mean_psnr": mean_psnr(x, x0), "max_linf": int((y - x0).abs().max()), "crafted_from": crafted}
    return save_folder(out, y, protected, crafted, stats), stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="eot-grating10", help="A bench/robust_protection.py candidate, crafted.")
    parser.add_argument("--defenses", nargs="+", default=["none", "at"])
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    args = matrix_protocol(parser.parse_args())
    path = RESULTS_DIR / "pixel_pilot.json"
    record = read_json(path) if path.exists() else {"runs": {}}
    dataset, stats = build(args.base, args.dataset)
    entry = record["runs"].setdefault(args.base, {**stats, "cells": {}})
    for column in args.defenses:
        cell = matrix.victim("sep-robust", dataset, args.dataset, column, args, data_name=f"robust-pixel-{args.base}")
        entry["cells"][column] = cell["eval_accuracy"]
        reliance = shortcut_reliance(matrix.victim_dir("sep-robust", column, args.eps, args.model,
                                                       data_name=f"robust-pixel-{args.base}"), args.dataset)
        entry.setdefault("shortcut_reliance", {})[column] = reliance
        write(record)
    write(record)


def shortcut_reliance(victim_dir, clean_path: str, num_classes: int = 10, rows: int = 2000) -> dict:
    """How much a trained victim uses the pixel shortcuts: its accuracy on the first ``rows`` clean test
    images as they are, with their own class's pixel, and with the next class's pixel (and how often it
    then predicts that next class)."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(victim_dir / "model")).eval()
    normalization = read_json(victim_dir / "results.json")["normalization"]
    mean, std = (torch.tensor(normalization[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    test = load_dataset(clean_path, split=f"test[:{rows}]")
    x, labels = to_tensor(test["img"]).float() / 255, torch.tensor(test["label"])
    shifted = (labels + 1) % num_classes

    def predict(images):
        with torch.no_grad():
            return torch.cat([model(pixel_values=(b - mean) / std).logits.argmax(1) for b in images.split(500)])

    plain, own = predict(x), predict(class_pixels(x, labels, num_classes, SEED))
    other = predict(class_pixels(x, shifted, num_classes, SEED))
    return {"clean": float((plain == labels).float().mean()), "own_class_pixel": float((own == labels).float().mean()),
            "next_class_pixel": float((other == labels).float().mean()),
            "predicts_next_class": float((other == shifted).float().mean())}


def write(record: dict) -> None:
    columns = sorted({c for entry in record["runs"].values() for c in entry["cells"]})
    rows = [[name, f"{e['base_mean_psnr']:.1f} -> {e['mean_psnr']:.1f}", e["max_linf"],
             *(f"{e['cells'][c]:.4f}" if c in e["cells"] else "-" for c in columns)] for name, e in record["runs"].items()]
    write_results("pixel_pilot", record, markdown_table(["base candidate", "PSNR dB", "max Linf", *columns], rows))


if __name__ == "__main__":
    main()
