"""The ``sep-hf`` command: ``sep-hf protect | train-source | train-victim [flags]``.

Each subcommand parses its flag dataclasses with ``HfArgumentParser`` (or one ``.json`` / ``.yaml``
file holding them, transformers' convention) and calls one job function; ``recipes/*.py`` are the
same commands as scripts, for ``accelerate launch recipes/protect.py ...``. Several processes:
``accelerate launch -m sep_hf protect ...``.

A user error (bad dataset, flag, budget, checkpoints or Hub repo: ``ValueError`` or ``HubError``; the
Hub unreachable: ``publish.hub.unreachable``; an output folder that cannot be written, or whose disk
fills: ``utils.io.OutputError``) ends in one line on stderr saying what to do, exit status
2, before any compute where it can be known then; ``SEP_HF_TRACEBACK=1`` shows the traceback anyway.
A bug keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from accelerate import Accelerator
from transformers import HfArgumentParser

from sep_hf.arguments import HubArguments, RunArguments
from sep_hf.data.view import DataArguments
from sep_hf.defenses import defense_arguments
from sep_hf.protect import protection_arguments
from sep_hf.protect.job import ProtectArguments, budget_text, check_protect_flags, run_protection
from sep_hf.publish.cards import defense_label
from sep_hf.publish.hub import HubError, unreachable
from sep_hf.source.job import run_source_training
from sep_hf.source.recipe import SourceTrainingConfig
from sep_hf.utils.io import reporting_full_disk
from sep_hf.utils.launch import end_process_group, prepare_launch
from sep_hf.utils.logging import setup_logging
from sep_hf.utils.runtime import resolve_mixed_precision
from sep_hf.victim.job import VictimArguments, run_victim
from sep_hf.victim.trainer import TrainerArguments, VictimTrainingConfig

__all__ = ["main", "protect", "train_source", "train_victim", "parse_args", "run_main", "COMMANDS"]


def parse_args(parser: HfArgumentParser, argv: Sequence[str]) -> tuple:
    """Flags, or a single ``.json`` / ``.yaml`` file holding them."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(args=list(argv))


def _accelerator(run_args: RunArguments) -> Accelerator:
    return Accelerator(mixed_precision=resolve_mixed_precision(run_args.mixed_precision, use_cpu=False),
                       gradient_accumulation_steps=run_args.gradient_accumulation_steps)


def train_source_parser() -> HfArgumentParser:
    # --defense trains the source through a victim defense (its flags: --jpeg_quality, --at_eps, ...)
    """The flags of ``sep-hf train-source``: recipe, data, run, Hub, and every registered defense's."""
    return HfArgumentParser((SourceTrainingConfig, DataArguments, RunArguments, HubArguments, *defense_arguments()))


def train_source(argv: Sequence[str]) -> None:
    """Train the source model and keep its checkpoints (the self-ensemble); push them privately."""
    config, data_args, run_args, hub_args, *defense_args = parse_args(train_source_parser(), argv)
    run_args.output_dir = run_args.output_dir or "runs/source"
    accelerator = _accelerator(run_args)
    with reporting_full_disk(run_args.output_dir):
        results = run_source_training(config, data_args, run_args, hub_args, accelerator, defense_args=defense_args)
    accelerator.print(f"clean test accuracy {results['clean_test_accuracy']:.4f} after {results['train_seconds']:.0f}s; "
                      f"checkpoints at epochs {results['checkpoints']} in {run_args.output_dir}")


def protect_parser() -> HfArgumentParser:
    # Every registered method contributes its own flag dataclass (SEP's --steps, CUDA's --cuda_key, ...).
    """The flags of ``sep-hf protect``: protection, data, source recipe, run, and every registered method's."""
    return HfArgumentParser((ProtectArguments, DataArguments, SourceTrainingConfig, RunArguments,
                             *protection_arguments()))


def protect(argv: Sequence[str]) -> None:
    """Craft the protection of a dataset (training the source first without --checkpoints) and publish it."""
    args, data_args, source_config, run_args, *method_args = parse_args(protect_parser(), argv)
    run_args.output_dir = run_args.output_dir or f"runs/protect-{args.method}"
    check_protect_flags(args, method_args)  # before the Accelerator: its errors are not the user's
    accelerator = _accelerator(run_args)
    with reporting_full_disk(run_args.output_dir):
        results = run_protection(args, data_args, source_config, run_args, accelerator, method_args)
    if results is not None:
        where = results["hub_dataset_id"] or f"{run_args.output_dir}/dataset"
        print(f"{args.method} ({budget_text(results['eps'])}): {results['counts']} images, max L-inf "
              f"{results['max_linf']}/255, mean PSNR {results['mean_psnr']:.1f} dB -> {where}")


def train_victim_parser() -> HfArgumentParser:
    # Every registered defense contributes its own flag dataclass (--at_eps, --jpeg_quality, ...).
    """The flags of ``sep-hf train-victim``: recipe, data, run, Hub, victim, Trainer, every defense's."""
    return HfArgumentParser((VictimTrainingConfig, DataArguments, RunArguments, HubArguments, VictimArguments,
                             TrainerArguments, *defense_arguments()))


def train_victim(argv: Sequence[str]) -> None:
    """Train an appropriator's model on a (protected) dataset and report its clean test accuracy."""
    config, data_args, run_args, hub_args, victim_args, trainer_args, *defense_args = parse_args(
        train_victim_parser(), argv)
    run_args.output_dir = run_args.output_dir or "runs/victim"
    with reporting_full_disk(run_args.output_dir):
        results = run_victim(config, data_args, run_args, hub_args, victim_args, defense_args, trainer_args)
    if results is not None:
        print(f"{results['model']} trained on {results['dataset']} ({results['num_train']} images, defense "
              f"{defense_label(results['defense'], results['defense_settings'])}): clean test accuracy "
              f"{results['eval_accuracy']:.4f}")


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "protect": protect, "train-source": train_source, "train-victim": train_victim}
PARSERS = {"protect": protect_parser, "train-source": train_source_parser, "train-victim": train_victim_parser}


def _exit_with_one_line(err: Exception) -> None:
    """Exit with status 2 and ``err`` as one ``error:`` line (a server's message may hold newlines), or raise
    it with ``SEP_HF_TRACEBACK=1``."""
    if os.environ.get("SEP_HF_TRACEBACK"):
        raise err
    print("error: " + " ".join(str(err).split()), file=sys.stderr)
    sys.exit(2)


def run_main(command: Callable[[Sequence[str]], None], argv: Sequence[str], prog: str | None = None) -> None:
    """Run one command as a process entry point: launcher fixes, logging, one-line user errors (module docstring)."""
    prepare_launch()  # accelerate's --cpu launcher: N processes, cores shared (sep_hf/utils/launch.py)
    setup_logging()
    if prog is not None:
        sys.argv[0] = prog  # --help shows how it was called
    try:
        command(argv)
    except (ValueError, HubError) as err:  # DatasetError and CheckpointError are ValueErrors
        _exit_with_one_line(err)
    except Exception as err:
        if unreachable(err) is None:  # a bug: its traceback
            raise
        _exit_with_one_line(unreachable(err))  # the network is the user's to fix, like a flag
    finally:
        end_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    """``sep-hf COMMAND [flags]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: sep-hf {{{','.join(COMMANDS)}}} [flags]   (sep-hf COMMAND --help lists the flags)", file=sys.stderr)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    run_main(COMMANDS[argv[0]], argv[1:], prog=f"sep-hf {argv[0]}")


if __name__ == "__main__":
    main()
