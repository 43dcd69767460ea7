"""Protect an image dataset with SEP and publish it: train (or reuse) checkpoints, craft, push.

    accelerate launch recipes/protect.py --dataset cifar10 --push_to_hub --hub_dataset_id org/cifar10-sep
    accelerate launch recipes/protect.py --dataset cifar10 --preset cpu            # minutes on 2 CPU cores
    accelerate launch recipes/protect.py --dataset cifar10 --checkpoints org/cifar10-sep-source --method sep --eps 4

Without --checkpoints the source model is trained first (recipes/train_source.py's loop) and its
checkpoints go to <hub_dataset_id>-source (private) when pushing. Crafting runs in resumable shards
split across `accelerate launch --num_processes N` processes; rerunning a killed command resumes.
The protected DatasetDict keeps the source's columns and labels (a drop-in replacement) and is
written to OUTPUT_DIR/dataset (load_dataset works on it) and pushed with its card in one commit.
Writes OUTPUT_DIR/results.json (method, eps, counts, max L-inf, PSNR, wall seconds per stage).
"""

import sys

from sep_hf.cli import protect, run_main

if __name__ == "__main__":
    run_main(protect, sys.argv[1:])  # the same as `sep-hf protect` (sep_hf/cli.py)
