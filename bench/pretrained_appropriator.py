"""The pretrained appropriator: protections against a pretrained backbone fine-tuned or linearly probed.

    python bench/source_cpu.py                                   # the protections' source (bench/runs/source-cpu)
    python bench/pretrained_appropriator.py --stage all          # backbone, matrix, trajectory, report (resumable)

No ImageNet weights can be fetched offline, so this bench builds its own stand-in:

- backbone:   a smallnet_cifar pretrained (recipes/train_source.py --preset cpu) on CIFAR-10 training rows
              10,000-49,999 (outside the 10k the data owner protects) of 5 of the 10 classes (airplane,
              automobile, bird, cat, deer; evaluated on test rows 2,000+ of those classes, outside the 2k
              the matrix evaluates on), exported with timm's ``save_for_hf`` and pushed to a loopback Hub
              (bench/runs/hub) as an ordinary timm model repo. Every pretrained victim loads it from there
              as it would a public checkpoint: ``train_victim.py --model hf-hub:sep-hf-bench/...``.
- matrix:     ``bench/protection_matrix.py --defenses standin-ft standin-probe`` for the rows clean,
              sep-fa-vr, sep-robust and cuda (the floors of bench/results/protection_matrix.json include
              the new columns).
- trajectory: the idea for a protection that holds: the self-ensemble taken from the fine-tuning
              trajectory of the same backbone (train_source.py --model hf-hub:... --preset cpu, 6
              checkpoints), SEP-FA-VR crafted with it, measured in the columns none, standin-ft and
              standin-probe (row ``sep-fa-vr-ftsource``).
- report:     overall accuracy and accuracy on classes seen / unseen in pretraining for every cell,
              bench/results/pretrained_appropriator.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protection_matrix  # noqa: E402
import sep_effectiveness  # noqa: E402
from common import (  # noqa: E402
    BACKBONE_MODEL,
    BACKBONE_REPO,
    REPO_ROOT,
    RESULTS_DIR,
    RUNS_DIR,
    SHARED_CIFAR10,
    bench_hub,
    launch,
    markdown_table,
    read_json,
    write_results,
)

NAME = "pretrained_appropriator"
ROOT = RUNS_DIR / "pretrained"
SEEN_CLASSES = [0, 1, 2, 3, 4]  # airplane, automobile, bird, cat, deer
PROTECTED_ROWS = 10_000  # the matrix protects training rows 0..9,999 and evaluates on test rows 0..1,999
EVAL_ROWS = 2_000
ROWS = ["clean", "sep-fa-vr", "sep-robust", "cuda"]
COLUMNS = ["none", "standin-ft", "standin-probe"]
TRAJECTORY_ROW = "sep-fa-vr-ftsource"


def build_pretraining_data(folder: Path) -> dict:
    """CIFAR-10 rows outside the protected and evaluated ones, SEEN_CLASSES only, as a Hub-layout folder."""
    import datasets

    if (folder / "info.json").exists():
        return read_json(folder / "info.json")
    source = datasets.load_dataset(str(SHARED_CIFAR10))
    names = source["train"].features["label"].names
    features = source["train"].features.copy()
    features["label"] = datasets.ClassLabel(names=[names[i] for i in SEEN_CLASSES])
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "data").mkdir(parents=True)
    counts = {}
    for split, first in (("train", PROTECTED_ROWS), ("test", EVAL_ROWS)):
        rows = source[split].select(range(first, len(source[split])))
        rows = rows.filter(lambda label: label in SEEN_CLASSES, input_columns="label")
        rows = rows.cast(features)  # labels 0..4 keep their index: SEEN_CLASSES are the first five
        rows.to_parquet(staging / "data" / f"{split}-00000-of-00001.parquet")
        counts[split] = len(rows)
    info = {"classes": [names[i] for i in SEEN_CLASSES], "rows": counts,
            "source": f"CIFAR-10 train rows {PROTECTED_ROWS}+ and test rows {EVAL_ROWS}+ of the classes above"}
    (staging / "info.json").write_text(__import__("json").dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return info


def backbone(state: dict) -> None:
    """Pretrain, export as a timm repo, push to the bench Hub."""
    from huggingface_hub import HfApi

    from sep_hf.testing.backbone import export_source_checkpoint

    info = build_pretraining_data(ROOT / "cifar10-5cls")
    source_dir = ROOT / "backbone-source"
    if not (source_dir / "results.json").exists():
        wall = launch("train_source.py", ["--dataset", ROOT / "cifar10-5cls", "--preset", "cpu", "--max_train_samples",
                                          info["rows"]["train"], "--max_eval_samples", info["rows"]["test"],
                                          "--num_checkpoints", 1, "--output_dir", source_dir],
                      log=ROOT / "backbone-source.log")
        state["backbone_wall_seconds"] = wall
    results = read_json(source_dir / "results.json")
    card = (f"---\nlibrary_name: timm\ntags: [image-classification, timm, sep-hf-bench]\n---\n\n# {BACKBONE_REPO.split('/')[-1]}\n\n"
            f"A `smallnet_cifar` (sep_hf.models) pretrained with `recipes/train_source.py --preset cpu` on "
            f"{info['rows']['train']} CIFAR-10 training images of 5 classes ({', '.join(info['classes'])}): rows "
            f"{PROTECTED_ROWS}+ of the training split, outside the images the benchmark protects. Accuracy on "
            f"{info['rows']['test']} test images of those classes: {results['clean_test_accuracy']:.4f}. "
            "A stand-in for ImageNet weights in sep-hf's offline benchmarks.\n")
    folder = export_source_checkpoint(source_dir, ROOT / "backbone-export", card=card)
    with bench_hub() as env:
        api = HfApi(endpoint=env["HF_ENDPOINT"], token=env["HF_TOKEN"])
        api.create_repo(BACKBONE_REPO, exist_ok=True, private=False)
        commit = api.upload_folder(repo_id=BACKBONE_REPO, folder_path=str(folder), commit_message="Upload backbone")
    state["backbone"] = {"repo": BACKBONE_REPO, "model": BACKBONE_MODEL, "revision": commit.oid,
                         "architecture": "smallnet_cifar", "pretraining_classes": info["classes"],
                         "pretraining_images": info["rows"], "pretraining_data": info["source"],
                         "accuracy_on_pretraining_classes": results["clean_test_accuracy"],
                         "epochs": results["training_config"]["epochs"], "train_seconds": results["train_seconds"]}


def matrix(state: dict) -> None:
    launch_plain([sys.executable, str(REPO_ROOT / "bench" / "protection_matrix.py"), "--protections", *ROWS,
                  "--defenses", "standin-ft", "standin-probe"])


def launch_plain(command: list[str]) -> None:
    import subprocess

    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)


def trajectory(state: dict) -> None:
    """SEP-FA-VR from the backbone's own fine-tuning trajectory, measured in COLUMNS."""
    source_dir = ROOT / "source-cpu-ft"
    with bench_hub() as env:
        if not (source_dir / "results.json").exists():
            launch("train_source.py", ["--dataset", SHARED_CIFAR10, "--preset", "cpu", "--model", BACKBONE_MODEL,
                                       "--output_dir", source_dir], env=env, log=ROOT / "source-cpu-ft.log")
        source = read_json(source_dir / "results.json")
        state["trajectory_source"] = {"model": BACKBONE_MODEL, "clean_test_accuracy": source["clean_test_accuracy"],
                                      "checkpoints": source["checkpoints"], "train_seconds": source["train_seconds"],
                                      "backbone_lr_scale": source["training_config"]["backbone_lr_scale"]}
        dataset, protection = sep_effectiveness.protect("sep-fa-vr", 8.0, str(source_dir), str(SHARED_CIFAR10),
                                                        name=TRAJECTORY_ROW)
        state["trajectory_crafting"] = protection_matrix.crafting_record(dataset, protection)
        protection_matrix.HUB_ENV.update(env)
        args = SimpleNamespace(eps=8.0, model="smallnet_cifar", max_train_samples=None, max_eval_samples=None,
                               epochs=None, report_only=False)
        cells = state.setdefault("trajectory_cells", {})
        for column in COLUMNS:
            cells[column] = protection_matrix.victim(TRAJECTORY_ROW, str(dataset), str(SHARED_CIFAR10), column, args,
                                                     data_name=f"{TRAJECTORY_ROW}-eps8")


def report(state: dict) -> None:
    matrix_json = read_json(RESULTS_DIR / "protection_matrix.json")
    cells = {row: {column: matrix_json["cells"].get(row, {}).get(column) for column in COLUMNS} for row in ROWS}
    cells[TRAJECTORY_ROW] = state.get("trajectory_cells", {})
    psnr = {row: (matrix_json["crafting"].get(row) or {}).get("mean_psnr") for row in ROWS}
    psnr[TRAJECTORY_ROW] = (state.get("trajectory_crafting") or {}).get("mean_psnr")
    floors = {row: matrix_json["protections"].get(row, {}) for row in ROWS}

    def text(cell):
        if not cell or "eval_accuracy" not in cell:
            return "-"
        split = ""
        if cell.get("eval_accuracy_seen_classes") is not None:
            split = f" ({cell['eval_accuracy_seen_classes']:.3f} / {cell['eval_accuracy_unseen_classes']:.3f})"
        return f"{cell['eval_accuracy']:.4f}{split}"

    table = markdown_table(["training data \\ appropriator", *COLUMNS, "matrix floor (all columns)", "PSNR dB"],
                           [[row, *(text(cells[row].get(c)) for c in COLUMNS),
                             (f"{floors[row]['floor']:.4f} ({floors[row]['floor_defense']})" if floors.get(row, {}).get("floor")
                              else "-"), f"{psnr[row]:.1f}" if psnr.get(row) else "-"] for row in [*ROWS, TRAJECTORY_ROW]])
    table += ("\n\nPretrained cells: overall accuracy on the 2,000 clean test images (on the classes the backbone was "
              "pretrained on / on the other five).")
    backbone_info = state.get("backbone", {})
    if backbone_info:
        table += (f"\n\nBackbone: {backbone_info['architecture']} pretrained on {backbone_info['pretraining_images']['train']} "
                  f"images of {', '.join(backbone_info['pretraining_classes'])} (accuracy "
                  f"{backbone_info['accuracy_on_pretraining_classes']:.4f} on {backbone_info['pretraining_images']['test']} "
                  "test images of those classes).")
    write_results(NAME, {**state, "rows": [*ROWS, TRAJECTORY_ROW], "columns": COLUMNS, "cells": cells, "psnr": psnr,
                         "matrix_floors": floors,
                         "commands": ["python bench/source_cpu.py", "python bench/pretrained_appropriator.py --stage all"]},
                  table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["backbone", "matrix", "trajectory", "report", "all"], default="all")
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    result = RESULTS_DIR / f"{NAME}.json"
    state = {k: v for k, v in read_json(result).items() if k not in ("machine",)} if result.exists() else {}
    for name, stage in {"backbone": backbone, "matrix": matrix, "trajectory": trajectory}.items():
        if args.stage in (name, "all"):
            stage(state)
            report(state)  # after every stage: a later failure keeps what was measured
    if args.stage == "report":
        report(state)


if __name__ == "__main__":
    main()
