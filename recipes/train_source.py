"""Train the SEP source model with accelerate and keep its checkpoints (the self-ensemble).

    accelerate launch recipes/train_source.py --dataset cifar10 --preset paper --num_checkpoints 30 \
        --output_dir runs/source --push_to_hub --hub_model_id org/cifar10-resnet18-sep-source

    accelerate launch --cpu recipes/train_source.py --dataset cifar10 --preset cpu --output_dir runs/source-cpu

Flags come from dataclasses (SourceTrainingConfig, DataArguments, RunArguments /
HubArguments); a single .json or .yaml argument works too. Every preset
value can be overridden by its flag. Rerunning the same command resumes from the last complete
checkpoint (local, or the Hub repo's when the local folder is gone).

Evidence (bench/results/source_cpu.json): --preset cpu on 2 CPU cores, first 10k CIFAR-10 images,
first 2k test images.
"""

import sys

from sep_hf.cli import run_main, train_source

if __name__ == "__main__":
    run_main(train_source, sys.argv[1:])  # the same as `sep-hf train-source` (sep_hf/cli.py)
