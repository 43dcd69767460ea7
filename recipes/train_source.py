"""Train the SEP source model with accelerate and keep its checkpoints (the self-ensemble).

    accelerate launch recipes/train_source.py --dataset cifar10 --preset paper --num_checkpoints 30 \
        --output_dir runs/source --push_to_hub --hub_model_id org/cifar10-resnet18-sep-source

    accelerate launch --cpu recipes/train_source.py --dataset cifar10 --preset cpu --output_dir runs/source-cpu

Flags come from dataclasses (sep_hf.source.train.SourceTrainingConfig, sep_hf.data.DataArguments,
sep_hf.arguments.RunArguments / HubArguments); a single .json or .yaml argument works too. Every preset
value can be overridden by its flag. Rerunning the same command resumes from the last complete
checkpoint (local, or the Hub repo's when the local folder is gone).

Evidence (bench/results/source_cpu.json): --preset cpu on 2 CPU cores, first 10k CIFAR-10 images,
first 2k test images.
"""

from accelerate import Accelerator
from transformers import HfArgumentParser

from sep_hf.data.view import DataArguments
from sep_hf.defenses import defense_arguments
from sep_hf.arguments import HubArguments, RunArguments, parse_recipe_args, setup_logging, run_main
from sep_hf.source.job import run_source_training
from sep_hf.utils.launch import prepare_launch
from sep_hf.utils.runtime import resolve_mixed_precision
from sep_hf.source.recipe import SourceTrainingConfig


def make_parser() -> HfArgumentParser:
    # --defense trains the source through a victim defense (its flags: --jpeg_quality, --at_eps, ...)
    return HfArgumentParser((SourceTrainingConfig, DataArguments, RunArguments, HubArguments, *defense_arguments()))


def main():
    prepare_launch()  # accelerate's --cpu launcher: N processes, cores shared (sep_hf/launch.py)
    config, data_args, run_args, hub_args, *defense_args = parse_recipe_args(make_parser())
    run_args.output_dir = run_args.output_dir or "runs/source"
    setup_logging()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(run_args.mixed_precision, use_cpu=False),
        gradient_accumulation_steps=run_args.gradient_accumulation_steps,
    )
    # Training, checkpoints, card and (optionally) push to the Hub
    results = run_source_training(config, data_args, run_args, hub_args, accelerator, defense_args=defense_args)
    accelerator.print(
        f"clean test accuracy {results['clean_test_accuracy']:.4f} after {results['train_seconds']:.0f}s; "
        f"checkpoints at epochs {results['checkpoints']} in {run_args.output_dir}"
    )


if __name__ == "__main__":
    run_main(main)
