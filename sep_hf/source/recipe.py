"""The training recipe shared by the source model and the victims: optimizer, schedule, augmentation flags.

``TrainingRecipe`` holds what both trainings read (SGD with momentum and weight decay, linear
warm-up then step or cosine decay, crop/flip augmentation, pretrained weights with the backbone at
``backbone_lr_scale`` x lr); ``SourceTrainingConfig`` adds what only the source needs (checkpoints
kept for the self-ensemble). Presets (``paper``, ``cpu``) live beside each config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from sep_hf.models import pretrained_weights_name
from sep_hf.source.checkpoints import evenly_spaced
from sep_hf.utils.flags import whole_number
from sep_hf.utils.presets import merge_presets

# 1,800 photos at batch 128 make a 14-step epoch: a one-epoch warm-up at lr 0.08 diverged (source loss 3.5,
# held-out accuracy 0.27), four epochs reached 0.595 (bench/results/own_dataset.json). CIFAR-10's
# presets warm up for 78 (cpu) and 390 (paper) steps, above the floor, so their runs are unchanged.
MIN_WARMUP_STEPS = 50


@dataclass
class TrainingRecipe:
    """Optimizer, schedule and augmentation shared by source and victim training (preset-filled)."""

    PRESETS: ClassVar[dict] = {
        # The SEP paper: ResNet-18, SGD 0.1 x0.1 at epochs 75 and 90, 120 epochs (GPU scale).
        "paper": dict(model="resnet18_cifar", epochs=120, batch_size=128, learning_rate=0.1, momentum=0.9,
                      nesterov=False, weight_decay=5e-4, label_smoothing=0.0, lr_schedule="step",
                      lr_milestones=[75, 90], warmup_epochs=1.0, crop_padding=4, flip=True),
        # Minutes on 2 CPU cores: the small net, 12 epochs, linear decay.
        "cpu": dict(model="smallnet_cifar", epochs=12, batch_size=128, learning_rate=0.08, momentum=0.9,
                    nesterov=True, weight_decay=5e-4, label_smoothing=0.1, lr_schedule="linear", lr_milestones=[],
                    warmup_epochs=1.0, crop_padding=4, flip=True),
    }

    model: str | None = field(default=None, metadata={"help": "timm model name, e.g. resnet18_cifar or smallnet_cifar."})
    epochs: int | None = field(default=None, metadata={"help": "Training epochs."})
    batch_size: int | None = field(default=None, metadata={"help": "Global batch size per optimizer step (all processes)."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak SGD learning rate."})
    momentum: float | None = field(default=None, metadata={"help": "SGD momentum."})
    nesterov: bool | None = field(default=None, metadata={"help": "Nesterov momentum."})
    weight_decay: float | None = field(default=None, metadata={"help": "SGD weight decay."})
    label_smoothing: float | None = field(default=None, metadata={"help": "Cross-entropy label smoothing."})
    lr_schedule: str | None = field(default=None, metadata={"help": "'step' (x0.1 at --lr_milestones) or 'linear' (decay to 0)."})
    lr_milestones: list[int] | None = field(default=None, metadata={"help": "Epochs where the 'step' schedule multiplies the lr by 0.1."})
    warmup_epochs: float | None = field(default=None, metadata={"help": f"Linear lr warm-up, in epochs (at least {MIN_WARMUP_STEPS} optimizer steps unless 0)."})
    crop_padding: int | None = field(default=None, metadata={"help": "Random-crop padding in pixels (0 disables)."})
    flip: bool | None = field(default=None, metadata={"help": "Random horizontal flips."})
    seed: int = field(default=0, metadata={"help": "Seed of initialization, data order and augmentation."})
    pretrained: bool = field(default=False, metadata={"help": "Start from timm's pretrained weights of --model (a timm tag such as resnet18.a1_in1k). Implied when --model is a Hub repo (hf-hub:org/name, org/name) or a local folder."})
    backbone_lr_scale: float = field(default=0.1, metadata={"help": "Fine-tuning pretrained weights: the backbone's learning rate is --learning_rate times this; the new classifier trains at --learning_rate."})

    def __post_init__(self):
        if self.model is not None and pretrained_weights_name(self.model, self.pretrained) is not None:
            self.pretrained = True  # a Hub repo or folder of a timm model is its weights
        if not self.backbone_lr_scale >= 0:
            raise ValueError(f"--backbone_lr_scale must be >= 0, got {self.backbone_lr_scale}.")
        if self.lr_schedule not in (None, "step", "linear"):
            raise ValueError(f"--lr_schedule must be 'step' or 'linear', not '{self.lr_schedule}'.")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) is not None:
                whole_number(getattr(self, name), f"--{name}")

    def weights_name(self) -> str | None:
        """What ``timm.create_model(pretrained=True)`` loads (``models.pretrained_weights_name``); None: from scratch."""
        return pretrained_weights_name(self.model, self.pretrained)

    def optimizer_and_schedule(self, parameters, steps_per_epoch: int):
        optimizer = torch.optim.SGD(parameters, lr=self.learning_rate, momentum=self.momentum,
                                    nesterov=self.nesterov, weight_decay=self.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self, steps_per_epoch))


@dataclass
class SourceTrainingConfig(TrainingRecipe):
    """Hyperparameters of the source run. ``None`` fields are filled from the preset."""

    # paper: 30 of 120 epochs, what SEP and SEP-FA use at equal compute with SEP-FA-VR's 15 + 15
    # (sep.SEPArguments.PAPER_NUM_MODELS); cpu: 6 of 12.
    PRESETS: ClassVar[dict] = merge_presets(TrainingRecipe.PRESETS, {"paper": {"num_checkpoints": 30},
                                                                     "cpu": {"num_checkpoints": 6}})

    num_checkpoints: int | None = field(default=None, metadata={"help": "K evenly spaced checkpoints (0: every epoch)."})
    defense: str = field(default="none", metadata={"help": "Train the source through a victim defense (sep_hf/defenses/: "
                                                           "jpeg, at, ...): a robust self-ensemble for sep-robust."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_checkpoints is not None:  # -1 would silently mean every epoch
            whole_number(self.num_checkpoints, "--num_checkpoints", minimum=0)

    def checkpoint_epochs(self) -> list[int]:
        if self.num_checkpoints <= 0:  # 0: every epoch
            return list(range(1, self.epochs + 1))
        return evenly_spaced(list(range(1, self.epochs + 1)), min(self.num_checkpoints, self.epochs))


def parameter_groups(timm_model: torch.nn.Module, recipe: TrainingRecipe, linear_probe: bool = False) -> list[dict]:
    """The optimizer's parameter groups of a timm model: from scratch, one group; pretrained weights
    fine-tuned, the backbone at ``backbone_lr_scale`` x the learning rate and the new classifier
    (timm's ``get_classifier()``) at the learning rate (discriminative fine-tuning, Howard & Ruder 2018);
    ``linear_probe``, the classifier only."""
    head = list(timm_model.get_classifier().parameters())
    if linear_probe:
        return [{"params": head}]
    if not recipe.pretrained or recipe.backbone_lr_scale == 1:
        return [{"params": list(timm_model.parameters())}]
    head_ids = {id(p) for p in head}
    backbone = [p for p in timm_model.parameters() if id(p) not in head_ids]
    return [{"params": backbone, "lr": recipe.learning_rate * recipe.backbone_lr_scale}, {"params": head}]


def lr_lambda(config: TrainingRecipe, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor per optimizer step: linear warm-up, then the recipe's decay (``LambdaLR``)."""
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    if config.warmup_epochs > 0:  # a small dataset's epoch is a few steps: too short a warm-up diverges
        warmup = max(warmup, min(MIN_WARMUP_STEPS, config.epochs * steps_per_epoch // 2))
    total = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        epoch = step // steps_per_epoch
        return 0.1 ** sum(epoch >= milestone for milestone in config.lr_milestones)

    return factor
