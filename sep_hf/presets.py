"""Presets: one table of defaults per scale, filled into any config dataclass by field name.

A field left at ``None`` takes the preset's value; a flag the user passed always wins.
"""

from __future__ import annotations

from dataclasses import fields

__all__ = ["PRESETS", "apply_preset"]

PRESETS = {
    # The SEP paper: ResNet-18 source, SGD 0.1 x0.1 at epochs 75 and 90, 120 epochs, 15 checkpoints,
    # SEP-FA-VR with 30 steps of 1/255 (GPU scale).
    "paper": dict(
        model="resnet18_cifar", epochs=120, batch_size=128, learning_rate=0.1, momentum=0.9, nesterov=False,
        weight_decay=5e-4, label_smoothing=0.0, lr_schedule="step", lr_milestones=[75, 90], warmup_epochs=1.0,
        crop_padding=4, flip=True, num_checkpoints=15, max_train_samples=None, max_eval_samples=None,
        steps=30, num_models=15,
    ),
    # Minutes on 2 CPU cores: the small net on the first 10k CIFAR-10 images (2k test images),
    # 12 epochs, 6 checkpoints, SEP with 10 steps.
    "cpu": dict(
        model="smallnet_cifar", epochs=12, batch_size=128, learning_rate=0.08, momentum=0.9, nesterov=True,
        weight_decay=5e-4, label_smoothing=0.1, lr_schedule="linear", lr_milestones=[], warmup_epochs=1.0,
        crop_padding=4, flip=True, num_checkpoints=6, max_train_samples=10_000, max_eval_samples=2_000,
        steps=10, num_models=6,
    ),
}


def apply_preset(preset: str, *configs) -> None:
    """Fill every ``None`` field of ``configs`` that the preset names; explicit flags win."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    values = PRESETS[preset]
    for config in configs:
        for item in fields(config):
            if item.name in values and getattr(config, item.name) is None:
                setattr(config, item.name, values[item.name])
