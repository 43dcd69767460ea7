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

from accelerate import Accelerator
from transformers import HfArgumentParser

from sep_hf.data.view import DataArguments
from sep_hf.arguments import RunArguments, parse_recipe_args, setup_logging, run_main
from sep_hf.protect.job import ProtectArguments, budget_text, run_protection
from sep_hf.utils.launch import prepare_launch
from sep_hf.protect import protection_arguments
from sep_hf.utils.runtime import resolve_mixed_precision
from sep_hf.source.recipe import SourceTrainingConfig


def make_parser() -> HfArgumentParser:
    # Every registered method contributes its own flag dataclass (SEP's --steps, CUDA's --cuda_key, ...).
    return HfArgumentParser((ProtectArguments, DataArguments, SourceTrainingConfig, RunArguments,
                             *protection_arguments()))


def main():
    prepare_launch()  # accelerate's --cpu launcher: N processes, cores shared (sep_hf/launch.py)
    args, data_args, source_config, run_args, *method_args = parse_recipe_args(make_parser())
    run_args.output_dir = run_args.output_dir or f"runs/protect-{args.method}"
    setup_logging()
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(run_args.mixed_precision, use_cpu=False),
                              gradient_accumulation_steps=run_args.gradient_accumulation_steps)

    # Checkpoints, crafting, dataset card, publication
    results = run_protection(args, data_args, source_config, run_args, accelerator, method_args)
    if results is not None:
        where = results["hub_dataset_id"] or f"{run_args.output_dir}/dataset"
        print(f"{args.method} ({budget_text(results['eps'])}): {results['counts']} images, "
              f"max L-inf {results['max_linf']}/255, "
              f"mean PSNR {results['mean_psnr']:.1f} dB -> {where}")


if __name__ == "__main__":
    run_main(main)
