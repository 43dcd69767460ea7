"""Source training: a plain accelerate loop whose checkpoints become the SEP ensemble.

Data stays in whole tensors; each epoch's order and augmentation come from generators seeded by
``(seed, epoch)`` only, so every process sees the same global batches (it trains on its own
slice), and a run resumed from a checkpoint replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from sep_hf.checkpoints import Checkpoint, evenly_spaced, list_checkpoints, save_checkpoint
from sep_hf.data import TrainingData
from sep_hf.models import build_model, pretrained_weights_name
from sep_hf.presets import merge_presets

__all__ = [
    "TrainingRecipe",
    "SourceTrainingConfig",
    "augment_crop_flip",
    "draw_crop_flip",
    "apply_crop_flip",
    "channel_stats",
    "parameter_groups",
    "evaluate_accuracy",
    "train_source",
]

logger = logging.getLogger(__name__)


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
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}.")

    def weights_name(self) -> str | None:
        """What ``timm.create_model(pretrained=True)`` loads (``models.pretrained_weights_name``); None: from scratch."""
        return pretrained_weights_name(self.model, self.pretrained)

    def optimizer_and_schedule(self, parameters, steps_per_epoch: int):
        optimizer = torch.optim.SGD(parameters, lr=self.learning_rate, momentum=self.momentum,
                                    nesterov=self.nesterov, weight_decay=self.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(self, steps_per_epoch))


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


def channel_stats(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units (``ImageRows``: streamed)."""
    if isinstance(images, torch.Tensor):
        pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
        return pixels.mean(1).tolist(), pixels.std(1).tolist()
    total = total_sq = count = 0
    for start in range(0, len(images), 1000):
        chunk = images[start : start + 1000].transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
        total, total_sq, count = total + chunk.sum(1), total_sq + chunk.pow(2).sum(1), count + chunk.shape[1]
    mean = total / count
    return mean.tolist(), ((total_sq - count * mean.pow(2)) / (count - 1)).clamp_min(0).sqrt().tolist()


def draw_crop_flip(n: int, padding: int, flip: bool, generator: torch.Generator) -> dict:
    """The random choices of ``augment_crop_flip`` for n images (flip mask, crop offsets), drawn in its order."""
    params = {"padding": padding, "flip": torch.rand(n, generator=generator) < 0.5 if flip else None}
    if padding > 0:
        params["dy"] = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        params["dx"] = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return params


def apply_crop_flip(images: torch.Tensor, params: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Apply drawn choices (``draw_crop_flip``) to a batch; ``rows`` picks the batch's entries of them."""
    pick = (lambda value: value) if rows is None else (lambda value: value[rows.cpu()])
    n, _, height, width = images.shape
    padding = params["padding"]
    if params["flip"] is not None:
        images = torch.where(pick(params["flip"]).view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    if padding > 0:
        padded = F.pad(images.float() if images.dtype == torch.uint8 else images, (padding,) * 4, mode="reflect")
        padded = padded.to(images.dtype)
        dy, dx = pick(params["dy"]).to(images.device), pick(params["dx"]).to(images.device)
        rows_ = (dy.view(-1, 1) + torch.arange(height, device=images.device)).view(n, 1, height, 1)
        cols = (dx.view(-1, 1) + torch.arange(width, device=images.device)).view(n, 1, 1, width)
        batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
        channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        images = padded[batch, channel, rows_, cols]
    return images


def augment_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (reflect padding) and horizontal flip of a whole batch, without a Python loop."""
    return apply_crop_flip(images, draw_crop_flip(len(images), padding, flip, generator))


def _seeded(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63)
    return torch.Generator().manual_seed(seed)


def _lr_lambda(config: TrainingRecipe, steps_per_epoch: int) -> Callable[[int], float]:
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


class _LogitsView(torch.nn.Module):
    """The source model as a defense's hooks see the victims' model: ``model(pixel_values=x).logits``."""

    def __init__(self, model: torch.nn.Module, num_classes: int):
        super().__init__()
        self.inner = model
        self.config = SimpleNamespace(num_labels=num_classes)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.inner(pixel_values))


class _SourceTrainerView:
    """What a defense's training hooks use of the victims' Trainer. The source model normalizes
    inside (``ImageClassifier``), so its inputs are pixels in [0, 1] already."""

    def __init__(self, model: torch.nn.Module, num_classes: int):
        self.model = _LogitsView(model, num_classes)

    @staticmethod
    def to_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values

    to_normalized = to_pixels


def _to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last: 1.5-1.6x faster convolutions on CUDA and on oneDNN CPUs (bench/README.md).
    return images.to(device, non_blocking=True).float().div_(255.0).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate_accuracy(model, images, labels: torch.Tensor, accelerator, batch_size: int = 500) -> float:
    """Accuracy over (images, labels), each process taking every N-th example, summed across processes.

    ``images``: uint8 (N, C, H, W), a tensor or ``ImageRows`` (only one batch is decoded at a time).
    """
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = torch.arange(rank, len(labels), world)
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for batch in mine.split(batch_size):
        with accelerator.autocast():
            logits = model(_to_float(images[batch], accelerator.device))
        correct += (logits.argmax(1) == labels[batch].to(accelerator.device)).sum()
    total = torch.tensor(len(mine), device=accelerator.device)
    correct, total = accelerator.reduce(torch.stack([correct, total]), reduction="sum")
    return (correct / total).item()


def _history_record(epoch: int, step: int, train_loss: float, accuracy: float, lr: float) -> dict:
    return {"epoch": epoch, "step": step, "train_loss": train_loss, "clean_test_accuracy": accuracy, "lr": lr}


def train_source(
    config: SourceTrainingConfig,
    data: TrainingData,
    output_dir: str | Path,
    accelerator,
    on_checkpoint: Callable[[Checkpoint, list[dict]], None] | None = None,
    resume_from: Checkpoint | None = None,
    defense=None,
) -> dict:
    """Train ``config.model`` on ``data`` and save checkpoints at ``config.checkpoint_epochs()``.

    ``defense`` (``sep_hf.defenses.build_defense(config.defense, ...)``) trains through a victim
    defense's hooks: its squeeze of the training images once, its per-batch inputs (PGD, mixup).

    ``resume_from`` (a complete checkpoint of the same run) restores weights, optimizer, scheduler
    and history; the data order depends only on (seed, epoch), so the continuation is exact.
    ``on_checkpoint(checkpoint, history)`` runs on the main process after each save (e.g. to upload).
    Returns the summary written to results.json.
    """
    output_dir = Path(output_dir)
    device = accelerator.device
    world = accelerator.num_processes
    if config.batch_size % (world * accelerator.gradient_accumulation_steps):
        raise ValueError(
            f"--batch_size {config.batch_size} must be divisible by processes x gradient accumulation "
            f"({world} x {accelerator.gradient_accumulation_steps})."
        )
    micro_batch = config.batch_size // (world * accelerator.gradient_accumulation_steps)
    num_train = len(data.train_images)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {config.batch_size} is larger than the {num_train} training images.")

    if defense is not None and defense.name != config.defense:
        raise ValueError(f"config.defense is '{config.defense}' but the defense passed is '{defense.name}'.")
    plain = defense is None or config.defense == "none"
    torch.manual_seed(config.seed)
    # of the data as published, as for the victims; a pretrained backbone keeps the normalization it learned with
    mean, std = channel_stats(data.train_images) if not config.pretrained else (None, None)
    model = build_model(config.model, num_classes=len(data.class_names), img_size=tuple(data.train_images.shape[2:]),
                        mean=mean, std=std, pretrained=config.pretrained)
    model = model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model.backbone, config)
    if not plain:
        model = defense.wrap_model(model)  # RSE's noise layers: hooks only, the state dict is unchanged
    optimizer, scheduler = config.optimizer_and_schedule(groups, steps_per_epoch)

    start_epoch, history, train_seconds = 0, [], 0.0
    if resume_from is not None:
        model.load_state_dict(resume_from.load_state_dict())
        state = resume_from.load_training_state()
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = resume_from.epoch
        history = list(resume_from.record.get("history", []))
        train_seconds = resume_from.record.get("train_seconds", 0.0)
        accelerator.print(f"Resuming from {resume_from.path} (epoch {start_epoch})")

    # The scheduler is stepped by hand once per optimizer step: accelerate's prepared scheduler
    # would step once per process, but our batch size is already global.
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoint_epochs = set(config.checkpoint_epochs())
    model_record = accelerator.unwrap_model(model).config
    in_memory = isinstance(data.train_images, torch.Tensor)
    if not (plain or in_memory):
        raise ValueError(f"--defense {config.defense} squeezes the whole training set in memory: raise "
                         "--keep_in_memory_mb above the decoded size or train the source without a defense.")
    train_images = (data.train_images if plain else defense.prepare_training_images(data.train_images)).to(device)
    train_labels = data.train_labels.to(device)
    trainer_view = None if plain else _SourceTrainerView(accelerator.unwrap_model(model), len(data.class_names))
    step = start_epoch * steps_per_epoch

    for epoch in range(start_epoch + 1, config.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        generator = _seeded(config.seed, epoch)
        order = torch.randperm(num_train, generator=generator).to(device)
        # The same draws whether the images are in memory (augmented at once) or decoded per batch.
        augmentation = draw_crop_flip(num_train, config.crop_padding, config.flip, generator)
        augmented = apply_crop_flip(train_images, augmentation) if in_memory else None
        loss_sum = torch.zeros((), device=device)
        for batch_index in range(steps_per_epoch):
            batch = order[batch_index * config.batch_size : (batch_index + 1) * config.batch_size]
            mine = batch[accelerator.process_index :: world]
            for micro in mine.split(micro_batch):
                with accelerator.accumulate(model):
                    batch_images = augmented[micro] if in_memory else apply_crop_flip(train_images[micro], augmentation, micro)
                    inputs, targets = _to_float(batch_images, device), train_labels[micro]
                    if trainer_view is not None:
                        inputs, targets = defense.training_batch(trainer_view, inputs, targets)
                    with accelerator.autocast():
                        loss = F.cross_entropy(model(inputs), targets, label_smoothing=config.label_smoothing)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.detach() * len(micro)
            scheduler.step()
            step += 1
        train_loss = (accelerator.reduce(loss_sum, reduction="sum") / (steps_per_epoch * config.batch_size)).item()
        accuracy = evaluate_accuracy(model, data.eval_images, data.eval_labels, accelerator)
        train_seconds += time.perf_counter() - epoch_start
        history.append(_history_record(epoch, step, train_loss, accuracy, scheduler.get_last_lr()[0]))
        accelerator.print(f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f}, "
                          f"clean test accuracy {accuracy:.4f} ({time.perf_counter() - epoch_start:.1f}s)")
        if epoch in checkpoint_epochs and accelerator.is_main_process:
            record = {
                "step": step, "train_loss": train_loss, "clean_test_accuracy": accuracy,
                "model": model_record, "class_names": list(data.class_names),
                "normalization": {"mean": model_record["mean"], "std": model_record["std"]},
                "dataset": {"id": data.dataset_id, "revision": data.dataset_revision,
                            "num_train": num_train, "num_eval": len(data.eval_images)},
                "training_config": asdict(config), "train_seconds": train_seconds, "history": history,
                "defense_settings": {} if plain else defense.describe(),
                "num_processes": world,
            }
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            checkpoint = save_checkpoint(output_dir, epoch, accelerator.unwrap_model(model).state_dict(), record, state)
            if on_checkpoint is not None:
                on_checkpoint(checkpoint, history)
        accelerator.wait_for_everyone()

    final = history[-1] if history else {}
    return {
        "clean_test_accuracy": final.get("clean_test_accuracy"),
        "train_seconds": train_seconds,
        "checkpoints": [ckpt.epoch for ckpt in list_checkpoints(output_dir)],
        "checkpoint_accuracy": {ckpt.epoch: ckpt.record["clean_test_accuracy"] for ckpt in list_checkpoints(output_dir)},
        "history": history,
        "model": model_record,
        "num_processes": world,
        "num_train": num_train,
        "num_eval": len(data.eval_images),
        "training_config": asdict(config),
    }
