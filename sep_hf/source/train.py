"""Source training: a plain accelerate loop whose checkpoints become the SEP ensemble.

Data stays in whole tensors; each epoch's order and augmentation come from generators seeded by
``(seed, epoch)`` only, so every process sees the same global batches (it trains on its own
slice), and a run resumed from a checkpoint replays exactly what an uninterrupted run does. A
dataset smaller than ``--batch_size`` trains as one smaller batch per epoch (``epoch_batch_size``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from sep_hf.data.load import public_name
from sep_hf.data.view import TrainingData
from sep_hf.models import build_model
from sep_hf.seeding import seeded_generator
from sep_hf.source.augment import apply_crop_flip, channel_stats, draw_crop_flip
from sep_hf.source.checkpoints import Checkpoint, list_checkpoints, save_checkpoint
from sep_hf.source.recipe import SourceTrainingConfig, parameter_groups
from sep_hf.utils.logging import get_logger

__all__ = [
    "epoch_batch_size",
    "evaluate_accuracy",
    "micro_batch_weight",
    "train_source",
]

logger = get_logger(__name__)


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


def epoch_batch_size(batch_size: int, num_train: int, parts: int) -> int:
    """The global batch of one optimizer step: ``batch_size``, or every training image when there are fewer
    (one smaller batch per epoch, as a DataLoader gives a short dataset), with a warning. ``parts``: processes
    x gradient accumulation steps, the micro-batches a batch is split into (each needs an image)."""
    if num_train >= batch_size:
        return batch_size
    if num_train < parts:
        raise ValueError(f"{num_train} training images cannot be split into {parts} micro-batches (processes x "
                         "gradient accumulation): use fewer processes or --gradient_accumulation_steps.")
    logger.warning("--batch_size %d is larger than the %d training images: each epoch is one batch of %d",
                   batch_size, num_train, num_train)
    return num_train


def micro_batch_weight(micro: int, batch: int, world: int, accumulation: int) -> float:
    """The factor on a micro-batch's mean loss that makes the step's gradient the mean over the whole global
    batch once accelerate divides by the accumulation steps and DDP averages over processes: exactly 1
    for equal micro-batches; a short batch (``epoch_batch_size``) splits unevenly (107 = 27 + 27 + 27 + 26)."""
    return micro * world * accumulation / batch


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
    world, accumulation = accelerator.num_processes, accelerator.gradient_accumulation_steps
    if config.batch_size % (world * accumulation):
        raise ValueError(
            f"--batch_size {config.batch_size} must be divisible by processes x gradient accumulation "
            f"({world} x {accumulation})."
        )
    num_train = len(data.train_images)
    batch_size = epoch_batch_size(config.batch_size, num_train, world * accumulation)
    steps_per_epoch = num_train // batch_size

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
        generator = seeded_generator(config.seed, epoch)
        order = torch.randperm(num_train, generator=generator).to(device)
        # The same draws whether the images are in memory (augmented at once) or decoded per batch.
        augmentation = draw_crop_flip(num_train, config.crop_padding, config.flip, generator)
        augmented = apply_crop_flip(train_images, augmentation) if in_memory else None
        loss_sum = torch.zeros((), device=device)
        for batch_index in range(steps_per_epoch):
            batch = order[batch_index * batch_size : (batch_index + 1) * batch_size]
            mine = batch[accelerator.process_index :: world]
            for micro in mine.tensor_split(accumulation):  # equal parts, but for a short batch
                with accelerator.accumulate(model):
                    batch_images = augmented[micro] if in_memory else apply_crop_flip(train_images[micro], augmentation, micro)
                    inputs, targets = _to_float(batch_images, device), train_labels[micro]
                    if trainer_view is not None:
                        inputs, targets = defense.training_batch(trainer_view, inputs, targets)
                    with accelerator.autocast():
                        loss = F.cross_entropy(model(inputs), targets, label_smoothing=config.label_smoothing)
                    accelerator.backward(loss * micro_batch_weight(len(micro), len(batch), world, accumulation))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.detach() * len(micro)
            scheduler.step()
            step += 1
        train_loss = (accelerator.reduce(loss_sum, reduction="sum") / (steps_per_epoch * batch_size)).item()
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
                "dataset": {"id": public_name(data.dataset_id), "revision": data.dataset_revision,
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
