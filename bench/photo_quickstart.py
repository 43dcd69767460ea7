"""The README's own-folder quickstart, exactly as written, and the real appropriator on its photos.

    python bench/photo_quickstart.py [--victim_size 260]

1. ``build_photo_folder('../shared/data/cifar10', 'photos', 500, 64, 320)`` and
   ``accelerate launch recipes/protect.py --dataset ./photos --preset cpu --image_size 64`` (the README's commands,
   in bench/runs/photo_quickstart/) against the bench's loopback Hub, so the default audit loads
   timm/tf_efficientnet_lite2.in1k as it does with internet: the source's held-out accuracy, the audit, the published
   size against the JPEGs'.
2. The appropriator on the native photos: ``train-victim --model hf-hub:timm/tf_efficientnet_lite2.in1k
   [--linear_probe]`` at --victim_size (default the weights' 260 px: timm's transforms from photos stored at that
   size) on the clean and on the protected folder, evaluated on 500 CIFAR-10 test images built the same way.
Writes bench/results/photo_quickstart.{json,md} (machine and precision with every figure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RUNS_DIR, SHARED_CIFAR10, bench_hub, launch, markdown_table, read_json, write_results  # noqa: E402

from sep_hf.testing.photos import build_photo_folder  # noqa: E402

NAME = "photo_quickstart"
ROOT = RUNS_DIR / NAME
BACKBONE = "hf-hub:timm/tf_efficientnet_lite2.in1k"


def main() -> None:
    from sep_hf.utils.runtime import resolve_mixed_precision

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--victim_size", type=int, default=260)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip_victims", action="store_true", help="Only the quickstart (source, audit, size).")
    args = parser.parse_args()
    photos, test, protected = ROOT / "photos", ROOT / "photos-test", ROOT / "runs" / "photos-sep"
    if not photos.exists():
        build_photo_folder(SHARED_CIFAR10, photos, 500, 64, 320)
    if not test.exists():
        build_photo_folder(SHARED_CIFAR10, test, 500, 64, 320, seed=1, split="test")
    victims = {}
    with bench_hub() as env:
        if not (protected / "results.json").exists():
            launch("protect.py", ["--dataset", photos, "--preset", "cpu", "--image_size", 64, "--output_dir", protected],
                   env=env, log=ROOT / "protect.log")
        for data_name, dataset in () if args.skip_victims else (("clean", photos), ("sep-fa-vr", protected / "dataset")):
            for mode, flags in (("linear-probe", ["--linear_probe", "true"]), ("pretrained-ft", [])):
                output = ROOT / "victims" / f"{data_name}-{mode}-{args.victim_size}px"
                if not (output / "results.json").exists():
                    launch("train_victim.py", ["--dataset", dataset, "--eval_dataset", test, "--preset", "cpu",
                                               "--model", BACKBONE, *flags, "--image_size", args.victim_size,
                                               "--epochs", args.epochs, "--output_dir", output],
                           env=env, log=output.with_suffix(".log"))
                victims[(data_name, mode)] = read_json(output / "results.json")
    results = read_json(protected / "results.json")
    held_out = results["checkpoints"].get("held_out_accuracy") or {}
    audit, size = results.get("audit", {}), results["size"]
    precision = resolve_mixed_precision("auto", use_cpu=True)
    table = markdown_table(
        ["source held-out accuracy (last checkpoint)", "chance", "audit: probe on clean", "audit: probe on protected",
         "published MB (PNG)", "source MB (JPEG)", "ratio", "protect wall s", "precision"],
        [[f"{held_out.get('accuracy', [float('nan')])[-1]:.4f}", f"{held_out.get('chance', float('nan')):.4f}",
          f"{audit.get('clean_accuracy', float('nan')):.4f}", f"{audit.get('protected_accuracy', float('nan')):.4f}",
          f"{size['published_bytes'] / 1e6:.1f}", f"{size['source_bytes'] / 1e6:.1f}", f"{size['ratio']:.1f}",
          f"{sum(results['wall_seconds'].values()):.0f}", precision]])
    table += "" if args.skip_victims else "\n\n" + markdown_table(
        ["victim data", "lite2 linear probe", "lite2 fine-tuned", "input px", "epochs"],
        [[name, f"{victims[(name, 'linear-probe')]['eval_accuracy']:.4f}", f"{victims[(name, 'pretrained-ft')]['eval_accuracy']:.4f}",
          args.victim_size, args.epochs] for name in ("clean", "sep-fa-vr")])
    write_results(NAME, {"protect": {"held_out_accuracy": held_out, "audit": audit, "size": size,
                                     "wall_seconds": results["wall_seconds"], "max_linf": results["max_linf"],
                                     "mean_psnr": results["mean_psnr"]},
                         "victims": {f"{d}/{m}": {"eval_accuracy": r["eval_accuracy"], "train_seconds": r["train_seconds"],
                                                  "input_size": r.get("input_size"), "num_train": r["num_train"],
                                                  "num_eval": r["num_eval"]} for (d, m), r in victims.items()},
                         "mixed_precision": precision,
                         "commands": ["python -c \"from sep_hf.testing.photos import build_photo_folder as b; "
                                      "b('../shared/data/cifar10', 'photos', 500, 64, 320)\"",
                                      "accelerate launch recipes/protect.py --dataset ./photos --preset cpu --image_size 64 "
                                      "--output_dir runs/photos-sep"]}, table)


if __name__ == "__main__":
    main()
