"""Pilot: the shipped sep-robust images plus a class-wise luma grating (sep_hf.gratings), post hoc.

    python bench/robust_protection.py --candidates eot --defenses none   # first: eot's crafted images
    python bench/grating_pilot.py --amplitudes 10 --defenses none jpeg

Adds a grating of ``--amplitude`` levels (1/255) to the crafted ``eot`` images of
bench/robust_protection.py (no new crafting: the grating is model-free), writes the dataset under
bench/runs/pilot-grating{A}/, and trains the matrix's victims on it (same protocol, cells under
victim-robust-grating{A}-...). Reports mean PSNR against the clean images, max L-inf and the cells;
writes bench/results/grating_pilot.{json,md}. A screen for choosing the amplitude: the candidate
proper crafts SEP with the grating in place (`--grating_amplitude`).
"""

import argparse
import json
import shutil

import numpy as np
import protection_matrix as matrix
import torch
from common import RESULTS_DIR, SHARED_CIFAR10, markdown_table, read_json, write_results
from datasets import Dataset, Image, load_dataset

from sep_hf.data.load import load_image_dataset
from sep_hf.gratings import class_gratings

SEED = 0


def to_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) for image in images])


def load_crafted(crafted: str, clean_path: str):
    """The crafted rows and the clean rows they protect: (protected split, x float (N, 3, H, W) in 0..255, x0, labels)."""
    protected = load_image_dataset(crafted).split("train")  # not load_dataset(folder): its cache is keyed on the card
    clean = load_dataset(clean_path, split=f"train[:{len(protected)}]")
    assert protected["label"] == clean["label"], "the crafted images are not the first rows of the clean split"
    return protected, to_tensor(protected["img"]).float(), to_tensor(clean["img"]).float(), torch.tensor(protected["label"])


def mean_psnr(y: torch.Tensor, x0: torch.Tensor) -> float:
    mse = (y - x0).pow(2).flatten(1).mean(1).clamp_min(1e-6)
    return float((10 * torch.log10(255**2 / mse)).mean())


def save_folder(out, y: torch.Tensor, protected, crafted: str, stats: dict) -> str:
    """``y`` (N, 3, H, W) in 0..255 as a Hub-layout folder out/dataset with the crafted card; stats.json last."""
    dataset_dir = out / "dataset"
    images = [y_.permute(1, 2, 0).to(torch.uint8).numpy() for y_ in y]
    table = Dataset.from_dict({"img": images, "label": protected["label"]}).cast_column("img", Image())
    table = table.cast_column("label", protected.features["label"])
    (dataset_dir / "data").mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(dataset_dir / "data" / "train-00000-of-00001.parquet"))
    shutil.copy(f"{crafted}/README.md", dataset_dir / "README.md")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return str(dataset_dir)


def build(amplitude: float, crafted: str, clean_path: str) -> tuple[str, dict]:
    out = matrix.RUNS_DIR / f"pilot-grating{amplitude:g}"
    if (out / "stats.json").exists():
        return str(out / "dataset"), read_json(out / "stats.json")
    protected, x, x0, labels = load_crafted(crafted, clean_path)
    grating = class_gratings(labels, torch.arange(len(labels)), x.shape[-2:], 10, SEED)
    y = (x + amplitude * grating).round().clamp(0, 255)
    stats = {"amplitude": amplitude, "mean_psnr": mean_psnr(y, x0), "max_linf": int((y - x0).abs().max()),
             "crafted_from": crafted}
    return save_folder(out, y, protected, crafted, stats), stats


def matrix_protocol(args):
    """``args`` with the protection matrix's victim protocol (8/255 rows, smallnet_cifar, cpu preset sizes)."""
    args.eps, args.model, args.report_only = 8.0, "smallnet_cifar", False
    for flag in ("max_train_samples", "max_eval_samples", "epochs"):
        setattr(args, flag, None)
    return args


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amplitudes", nargs="+", type=float, default=[10.0])
    parser.add_argument("--defenses", nargs="+", default=["none", "jpeg"])
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    args = matrix_protocol(parser.parse_args())
    crafted = str(matrix.RUNS_DIR / "protect-robust-eot-eps8" / "dataset")
    path = RESULTS_DIR / "grating_pilot.json"
    record = read_json(path) if path.exists() else {"runs": {}}
    for amplitude in args.amplitudes:
        dataset, stats = build(amplitude, crafted, args.dataset)
        entry = record["runs"].setdefault(f"{amplitude:g}", {**stats, "cells": {}})
        for column in args.defenses:
            cell = matrix.victim("sep-robust", dataset, args.dataset, column, args,
                                 data_name=f"robust-grating{amplitude:g}-eps8")
            entry["cells"][column] = cell["eval_accuracy"]
            write(record)
    write(record)


def write(record: dict) -> None:
    columns = sorted({c for entry in record["runs"].values() for c in entry["cells"]})
    rows = [[name, f"{e['mean_psnr']:.1f}", e["max_linf"], *(f"{e['cells'][c]:.4f}" if c in e["cells"] else "-" for c in columns)]
            for name, e in record["runs"].items()]
    write_results("grating_pilot", record, markdown_table(["amplitude", "PSNR dB", "max Linf", *columns], rows))


if __name__ == "__main__":
    main()
