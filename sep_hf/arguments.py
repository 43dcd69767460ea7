"""What every job shares: where and how it runs, Hub publishing flags, and recipe argument parsing."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

__all__ = ["RunArguments", "HubArguments", "parse_recipe_args", "check_pretrained", "setup_logging", "run_main", "RESULTS_FILE",
           "CURVE_FILE", "CARD_FILE"]

RESULTS_FILE = "results.json"
CURVE_FILE = "training_curve.png"
CARD_FILE = "README.md"


@dataclass
class RunArguments:
    """Where and how a job runs (infrastructure, not hyperparameters)."""

    output_dir: str | None = field(default=None, metadata={"help": "Local output folder (default: runs/<recipe>)."})
    preset: str = field(default="paper", metadata={"help": "Hyperparameter preset: 'paper' (GPU, the SEP paper) or 'cpu' (minutes on 2 cores)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Discard checkpoints of a different earlier run in --output_dir."})
    mixed_precision: str = field(default="auto", metadata={"help": "no | bf16 | fp16 | auto (bf16 where the device runs it fast). 'no' also makes crafting fp32."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})


@dataclass
class HubArguments:
    push_to_hub: bool = field(default=False, metadata={"help": "Push checkpoints and card to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Model repo for the checkpoints, e.g. my-org/cifar10-sep-source."})
    hub_private_repo: bool = field(default=True, metadata={"help": "Create the repo private (pass 'false' for public)."})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. my-org/cifar10-sep-source).")


def parse_recipe_args(parser) -> tuple:
    """Flags, or a single ``.json`` / ``.yaml`` file holding them (transformers' convention)."""
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(sys.argv[1])
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(sys.argv[1])
    return parser.parse_args_into_dataclasses()


def check_pretrained(config, data_args) -> dict | None:
    """Before any compute: the ``pretrained_cfg`` of a pretrained ``--model`` (None from scratch), read
    from its config.json (ValueError, one line, for a repo or folder timm cannot load), and
    ``--image_size`` defaulted to the size it was pretrained at."""
    from sep_hf.models import pretrained_config

    weights = config.weights_name()
    if weights is None:
        return None
    pretrained = pretrained_config(weights)
    if data_args.image_size is None:
        data_args.image_size = list(pretrained["input_size"][1:])
    return pretrained


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("sep_hf").setLevel(logging.INFO)


def run_main(main) -> None:
    """Run a recipe's ``main``; a user error (bad dataset, flag, budget, checkpoints or Hub repo) ends in
    one line on stderr saying what to do, and exit status 2, instead of a traceback.

    ``SEP_HF_TRACEBACK=1`` shows the traceback anyway. Anything else (a bug) keeps its traceback.
    """
    import os

    from sep_hf.publish.hub import HubError

    try:
        main()
    except (ValueError, HubError) as err:  # DatasetError and CheckpointError are ValueErrors
        if os.environ.get("SEP_HF_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
