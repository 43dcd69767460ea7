"""What every job shares: where and how it runs (``RunArguments``), Hub publishing flags (``HubArguments``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sep_hf.models import pretrained_config
from sep_hf.utils.flags import whole_number

__all__ = ["RunArguments", "HubArguments", "check_pretrained", "RESULTS_FILE", "CURVE_FILE", "CARD_FILE"]

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

    def __post_init__(self):
        whole_number(self.gradient_accumulation_steps, "--gradient_accumulation_steps")


@dataclass
class HubArguments:
    """Publishing a source run's checkpoints (``push_to_hub`` is opt-in; the repo is private by default)."""

    push_to_hub: bool = field(default=False, metadata={"help": "Push checkpoints and card to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Model repo for the checkpoints, e.g. my-org/cifar10-sep-source."})
    hub_private_repo: bool = field(default=True, metadata={"help": "Create the repo private (pass 'false' for public)."})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. my-org/cifar10-sep-source).")


def check_pretrained(config, data_args) -> dict | None:
    """Before any compute: the ``pretrained_cfg`` of a pretrained ``--model`` (None from scratch), read
    from its config.json (ValueError, one line, for a repo or folder timm cannot load), and
    ``--image_size`` defaulted to the size it was pretrained at."""
    weights = config.weights_name()
    if weights is None:
        return None
    pretrained = pretrained_config(weights)
    if data_args.image_size is None:
        data_args.image_size = list(pretrained["input_size"][1:])
    return pretrained
