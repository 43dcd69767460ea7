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
        steps=30, step_size=1.0, num_models=15,
        # EM / REM source model: the REM paper's 5,000 iterations of batch 128, lr 0.1 x0.1 every 2,000
        # (EM stops earlier, at 99% accuracy on x + delta); REM's inner attack 10 steps, 5 EOT draws.
        em_model="resnet18_cifar", em_iterations=5000, rem_iterations=5000, em_batch_size=128, em_learning_rate=0.1,
        em_lr_decay_every=2000, em_train_steps=10, rem_attack_steps=10, rem_eot=5,
    ),
    # Minutes on 2 CPU cores: the small net on the first 10k CIFAR-10 images (2k test images),
    # 12 epochs, 6 checkpoints, SEP with 10 steps of 2/255 (T * alpha = 2.5 eps; with 1/255 steps
    # plain SEP left the victim at 20.3% instead of 14.3%: bench/results/sep_effectiveness_*).
    "cpu": dict(
        model="smallnet_cifar", epochs=12, batch_size=128, learning_rate=0.08, momentum=0.9, nesterov=True,
        weight_decay=5e-4, label_smoothing=0.1, lr_schedule="linear", lr_milestones=[], warmup_epochs=1.0,
        crop_padding=4, flip=True, num_checkpoints=6, max_train_samples=10_000, max_eval_samples=2_000,
        steps=10, step_size=2.0, num_models=6,
        # EM / REM on the small net: 5 noise steps, EM trains 40 iterations between noise passes (at most
        # 800), REM 150 iterations (no lr decay) with a 2-step inner attack and 2 EOT draws.
        em_model="smallnet_cifar", em_iterations=800, rem_iterations=150, em_batch_size=128, em_learning_rate=0.1,
        em_lr_decay_every=320, em_train_steps=40, em_steps=5, rem_attack_steps=2, rem_eot=2,
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
