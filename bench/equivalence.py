"""Same output before and after a change: source checkpoints and protected images, bit for bit.

    python bench/equivalence.py --base 84eded0          # the commit before the stage-per-subpackage redesign

Checks out ``--base`` into a temporary worktree and runs the same small jobs with both trees on
this machine: a source run (2,000 images, 2 epochs, fp32 via SEP_HF_BF16=0), SEP-FA-VR crafting of
200 images with the base tree's checkpoints, in bf16 (the base tree has no fp32 switch for
crafting) and, for the current tree only, in fp32, and victims (2,000 clean images, 4 epochs, fp32)
trained with ``--defense none`` and ``--defense grayscale``. Writes bench/results/equivalence.{json,md}:
the sha256 of every checkpoint, parquet and victim weights file, the number of identical images, and
the victims' accuracies.
"""

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO_ROOT, SHARED_CIFAR10, markdown_table, read_json, write_results

from sep_hf.utils.runtime import fast_bf16

VICTIM_DEFENSES = ("none", "grayscale")


def run(tree: Path, recipe: str, args: list, env: dict) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--mixed_precision",
               "no", str(tree / "recipes" / recipe), *map(str, args)]
    subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), **env}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images(folder: Path) -> list:
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(next((folder / "dataset" / "data").glob("train-*.parquet")))
    return [np.array(Image.open(io.BytesIO(item["bytes"]))) for item in table.column("img").to_pylist()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="84eded0", help="The revision to compare with.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="equivalence-"))
    base_tree = work / "base"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base_tree), args.base], cwd=REPO_ROOT, check=True)
    trees = {"base": base_tree, "current": REPO_ROOT}
    source = ["--dataset", SHARED_CIFAR10, "--preset", "cpu", "--max_train_samples", 2000, "--max_eval_samples", 500,
              "--epochs", 2, "--num_checkpoints", 2, "--mixed_precision", "no"]
    protect = ["--dataset", SHARED_CIFAR10, "--preset", "cpu", "--max_train_samples", 200, "--max_eval_samples", 100,
               "--checkpoints", work / "base-source", "--method", "sep-fa-vr", "--steps", 3, "--num_models", 2,
               "--splits", "train"]
    victim = ["--dataset", SHARED_CIFAR10, "--preset", "cpu", "--max_train_samples", 2000, "--max_eval_samples", 1000,
              "--epochs", 4, "--mixed_precision", "no"]
    try:
        for name, tree in trees.items():
            run(tree, "train_source.py", [*source, "--output_dir", work / f"{name}-source"], {"SEP_HF_BF16": "0"})
            run(tree, "protect.py", [*protect, "--output_dir", work / f"{name}-bf16"], {})
        run(REPO_ROOT, "protect.py", [*protect, "--mixed_precision", "no", "--output_dir", work / "current-fp32"],
            {"SEP_HF_BF16": "0"})
        for name, tree in trees.items():
            for defense in VICTIM_DEFENSES:
                run(tree, "train_victim.py", [*victim, "--defense", defense, "--output_dir", work / f"{name}-victim-{defense}"],
                    {"SEP_HF_BF16": "0"})
        victims = {name: {defense: {"weights_sha256": sha256(work / f"{name}-victim-{defense}" / "model" / "model.safetensors"),
                                    "eval_accuracy": read_json(work / f"{name}-victim-{defense}" / "results.json")["eval_accuracy"]}
                          for defense in VICTIM_DEFENSES} for name in trees}
        checkpoints = {name: [sha256(p) for p in sorted((work / f"{name}-source").glob("checkpoints/*/model.safetensors"))]
                       for name in trees}
        crafted = {name: images(work / f"{name}-bf16") for name in trees}
        fp32 = images(work / "current-fp32")
        same_bf16 = sum(int((a == b).all()) for a, b in zip(crafted["base"], crafted["current"]))
        same_fp32 = sum(int((a == b).all()) for a, b in zip(crafted["base"], fp32))
        parquet = {name: sha256(next((work / f"{name}-bf16" / "dataset" / "data").glob("*.parquet"))) for name in trees}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO_ROOT, check=False)
    rows = [["source checkpoints (fp32, 2 epochs)", "identical" if checkpoints["base"] == checkpoints["current"]
             else "DIFFERENT", len(checkpoints["base"])],
            ["SEP-FA-VR images (bf16, both trees)", f"{same_bf16} / {len(crafted['base'])} identical",
             "parquet identical" if parquet["base"] == parquet["current"] else "parquet differs"],
            ["SEP-FA-VR images, current fp32 vs base bf16 " + ("(the switch works: they differ)" if fast_bf16("cpu") else
             "(no fast bf16 on this CPU: both ran fp32)"), f"{same_fp32} / {len(fp32)} identical", "-"]]
    for defense in VICTIM_DEFENSES:
        base, current = victims["base"][defense], victims["current"][defense]
        rows.append([f"victim weights, --defense {defense} (fp32, 4 epochs)",
                     "identical" if base["weights_sha256"] == current["weights_sha256"] else "DIFFERENT",
                     f"accuracy {base['eval_accuracy']:.4f} vs {current['eval_accuracy']:.4f}"])
    table = markdown_table(["output", "base vs current", "detail"], rows)
    write_results("equivalence", {"base": args.base, "current": subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip(),
        "checkpoint_sha256": checkpoints, "parquet_sha256": parquet, "identical_images_bf16": same_bf16,
        "identical_images_fp32_vs_base_bf16": same_fp32, "images": len(fp32), "bf16_fast_here": fast_bf16("cpu"),
        "victims": victims, "commands": {"source": source, "protect": protect, "victim": victim}}, table)


if __name__ == "__main__":
    main()
