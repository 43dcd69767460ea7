"""A data owner's own dataset: a photo folder of mixed sizes, train only, protected at native resolution.

    python bench/own_dataset.py --stage all            # build, protect, victims, rss, size224 (resumable)
    python bench/own_dataset.py --stage rss --rss_sizes 2000 20000

Stages (each skips what an earlier run finished; outputs under bench/runs/own_dataset/):
- build:    photos-train: CIFAR-10 training rows 0..N-1 upscaled to random sizes (64 to 320 px per side,
            JPEG q90, ImageFolder, train only); photos-test: CIFAR-10 test images built the same way.
- protect:  recipes/protect.py --dataset photos-train --preset cpu --image_size 64 (SEP-FA-VR, eps 8,
            the source trained in the run on 90% of the rows, 10% held out): published sizes equal the
            source's, per-pixel budget, PSNR, crafting img/s.
- victims:  recipes/train_victim.py --preset cpu --image_size 64 (the appropriator resizes to the model
            size) on the clean and on the protected folder, evaluated on photos-test.
- rss:      peak RSS of `python recipes/protect.py` (one process, given checkpoints, SEP-FA with one
            checkpoint and 1 step: class means over every image, then crafting) on
            N images of 112-144 px, for each N of --rss_sizes, at the default --keep_in_memory_mb and at 0.
- size224:  a timm resnet18 source at --image_size 224 on 224-px-class images: cost per image.
Writes bench/results/own_dataset.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, RUNS_DIR, SHARED_CIFAR10, launch, markdown_table, read_json, write_results  # noqa: E402

from sep_hf.testing.photos import build_photo_folder  # noqa: E402
from sep_hf.utils.runtime import resolve_mixed_precision

ROOT = RUNS_DIR / "own_dataset"
RESULT = RESULTS_DIR / "own_dataset.json"


def load_state() -> dict:
    return read_json(RESULT) if RESULT.exists() else {}


def save(state: dict) -> None:
    rows = []
    protect = state.get("protect", {})
    if protect:
        rows.append(["protect (sep-fa-vr, eps 8, model 64 px)", protect["images"], f"{protect['crafting_img_per_s']:.2f}",
                     f"{protect['mean_psnr']:.1f}", protect["max_linf"], protect["sizes_equal"], f"{protect['wall_s']:.0f}"])
    table = markdown_table(["run", "images", "crafting img/s", "PSNR dB", "max L-inf", "sizes equal source", "wall s"], rows)
    if state.get("victims"):
        table += "\n\n" + markdown_table(["victim data", "clean test accuracy"],
                                         [[name, f"{row['eval_accuracy']:.4f}"] for name, row in state["victims"].items()])
    if state.get("rss"):
        table += "\n\n" + markdown_table(["N images (~128 px)", "--keep_in_memory_mb", "peak RSS MiB", "wall s"],
                                         [[row["images"], row["keep_in_memory_mb"], f"{row['peak_rss_mib']:.0f}",
                                           f"{row['wall_s']:.0f}"] for row in state["rss"]])
    if state.get("size224"):
        row = state["size224"]
        table += "\n\n" + markdown_table(["224 px source", "images", "steps", "K", "crafting img/s", "s per image per gradient"],
                                         [[row["model"], row["images"], row["steps"], row["num_models"],
                                           f"{row['crafting_img_per_s']:.3f}", f"{row['s_per_image_gradient']:.4f}"]])
    state["precision"] = "bf16 autocast" if resolve_mixed_precision("auto", use_cpu=True) == "bf16" else "fp32"
    write_results("own_dataset", state, table)


def build(args) -> None:
    for name, split, count, seed, low, high in (("photos-train", "train", args.images, 0, 64, 320),
                                                 ("photos-test", "test", args.test_images, 1, 64, 320)):
        if not (ROOT / name).exists():
            build_photo_folder(SHARED_CIFAR10, ROOT / f"{name}.tmp", count, low, high, seed=seed, split=split)
            (ROOT / f"{name}.tmp").rename(ROOT / name)


def published_check(source: Path, published: Path) -> dict:
    """Sizes equal and per-pixel L-inf against the source, both read with plain load_dataset."""
    import datasets

    original = datasets.load_dataset(str(source))["train"]
    protected = datasets.load_dataset(str(published))["train"]
    sizes_equal, worst = True, 0
    for a, b in zip(original, protected):
        if a["image"].size != b["image"].size:
            sizes_equal = False
            continue
        worst = max(worst, int(np.abs(np.asarray(a["image"].convert("RGB"), dtype=np.int32)
                                      - np.asarray(b["image"].convert("RGB"), dtype=np.int32)).max()))
    return {"sizes_equal": sizes_equal and original.num_rows == protected.num_rows, "max_linf_load_dataset": worst}


def protect(args, state) -> None:
    out = ROOT / "protect"
    if "protect" in state:
        return
    command = ["--dataset", ROOT / "photos-train", "--preset", "cpu", "--image_size", args.image_size,
               "--method", "sep-fa-vr", "--output_dir", out]
    wall = launch("protect.py", command, log=out / "log.txt")
    results = read_json(out / "results.json")
    state["protect"] = {"command": "accelerate launch recipes/protect.py " + " ".join(map(str, command)),
                        "images": results["counts"]["train"], "wall_s": wall, "wall_seconds": results["wall_seconds"],
                        "crafting_img_per_s": results["counts"]["train"] / results["wall_seconds"]["crafting"],
                        "mean_psnr": results["mean_psnr"], "max_linf": results["max_linf"],
                        "resolution": results["resolution"], "image_size": results["image_size"],
                        "source_accuracy": read_json(out / "source" / "results.json")["clean_test_accuracy"],
                        **published_check(ROOT / "photos-train", out / "dataset")}
    save(state)


def victims(args, state) -> None:
    state.setdefault("victims", {})
    for name, data in (("clean photo folder", ROOT / "photos-train"), ("protected (sep-fa-vr)", ROOT / "protect" / "dataset")):
        if name in state["victims"]:
            continue
        out = ROOT / f"victim-{'clean' if 'clean' in name else 'protected'}"
        command = ["--dataset", data, "--eval_dataset", ROOT / "photos-test", "--image_size", args.image_size,
                   "--preset", "cpu", "--output_dir", out]
        wall = launch("train_victim.py", command, log=out / "log.txt")
        results = read_json(out / "results.json")
        state["victims"][name] = {"command": "accelerate launch recipes/train_victim.py " + " ".join(map(str, command)),
                                  "eval_accuracy": results["eval_accuracy"], "num_eval": results["num_eval"],
                                  "num_train": results["num_train"], "wall_s": wall}
        save(state)


def rss(args, state) -> None:
    state.setdefault("rss", [])
    done = {(row["images"], row["keep_in_memory_mb"]) for row in state["rss"]}
    checkpoints = ROOT / "protect" / "source"
    for count in args.rss_sizes:
        folder = ROOT / f"photos-{count}-128"
        if not folder.exists():
            build_photo_folder(SHARED_CIFAR10, ROOT / f"photos-{count}-128.tmp", count, 112, 144, seed=2)
            (ROOT / f"photos-{count}-128.tmp").rename(folder)
        for budget in (4096, 0):
            if (count, budget) in done:
                continue
            out = ROOT / f"rss-{count}-{budget}"
            command = [sys.executable, str(REPO_ROOT / "recipes" / "protect.py"), "--dataset", str(folder),
                       "--preset", "cpu", "--image_size", str(args.image_size), "--checkpoints", str(checkpoints),
                       "--method", "sep-fa", "--steps", "1", "--num_models", "1", "--keep_in_memory_mb", str(budget),
                       "--output_dir", str(out)]
            start = time.perf_counter()
            with open(ROOT / f"rss-{count}-{budget}.log", "w") as log:
                result = subprocess.run(["/usr/bin/time", "-v", *command], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - start
            text = (ROOT / f"rss-{count}-{budget}.log").read_text()
            if result.returncode != 0:
                raise RuntimeError(f"rss run failed; see {ROOT / f'rss-{count}-{budget}.log'}")
            peak_kib = int(next(line.split(":")[1] for line in text.splitlines() if "Maximum resident set size" in line))
            state["rss"].append({"images": count, "keep_in_memory_mb": budget, "peak_rss_mib": peak_kib / 1024,
                                 "wall_s": wall, "command": " ".join(command[1:])})
            save(state)


def size224(args, state) -> None:
    if "size224" in state:
        return
    folder = ROOT / "photos-224"
    if not folder.exists():
        build_photo_folder(SHARED_CIFAR10, ROOT / "photos-224.tmp", args.size224_images, 200, 320, seed=3)
        (ROOT / "photos-224.tmp").rename(folder)
    out = ROOT / "size224"
    steps, num_models = 2, 2
    command = ["--dataset", folder, "--preset", "cpu", "--image_size", 224, "--model", "resnet18", "--epochs", 2,
               "--num_checkpoints", num_models, "--batch_size", 16, "--method", "sep-fa", "--steps", steps,
               "--step_size", 4, "--craft_batch_size", 16, "--output_dir", out]
    launch("protect.py", command, log=out / "log.txt")
    results = read_json(out / "results.json")
    rate = results["counts"]["train"] / results["wall_seconds"]["crafting"]
    state["size224"] = {"command": "accelerate launch recipes/protect.py " + " ".join(map(str, command)),
                        "model": "resnet18 (timm)", "images": results["counts"]["train"], "steps": steps,
                        "num_models": num_models, "crafting_img_per_s": rate,
                        "s_per_image_gradient": 1 / rate / (steps * num_models), "wall_seconds": results["wall_seconds"],
                        "mean_psnr": results["mean_psnr"], "max_linf": results["max_linf"]}
    save(state)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["build", "protect", "victims", "rss", "size224", "all"], default="all")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--test_images", type=int, default=1000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--rss_sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--size224_images", type=int, default=64)
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    state = load_state()
    build(args)
    stages = {"protect": protect, "victims": victims, "rss": rss, "size224": size224}
    for name, stage in stages.items():
        if args.stage in (name, "all"):
            stage(args, state)
    save(state)


if __name__ == "__main__":
    main()
