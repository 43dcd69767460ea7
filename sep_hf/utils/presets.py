"""Presets, declared by each configuration dataclass beside its fields.

A config class lists its preset values in ``PRESETS = {"paper": {...}, "cpu": {...}}`` (a
ClassVar); ``apply_preset(name, *configs)`` fills every field left at ``None`` from the config's
own table. A flag the user passed always wins, and nothing is filled by field-name coincidence
into another dataclass.

* ``paper``: the SEP paper's setting (ResNet-18, full CIFAR-10, 120 epochs; a GPU job).
* ``cpu``: the same job sized for minutes on 2 CPU cores (small net, 10k/2k images).
"""

from __future__ import annotations

from dataclasses import fields

__all__ = ["PRESET_NAMES", "apply_preset", "merge_presets"]

PRESET_NAMES = ("paper", "cpu")


def merge_presets(*tables: dict) -> dict:
    """Union of preset tables (a subclass extending its parent's presets)."""
    return {name: {key: value for table in tables for key, value in table.get(name, {}).items()}
            for name in PRESET_NAMES}


def apply_preset(preset: str, *configs) -> None:
    """Fill every ``None`` field of each config from ``type(config).PRESETS[preset]``."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"Unknown preset '{preset}'; choose one of {', '.join(PRESET_NAMES)} (--preset).")
    for config in configs:
        table = getattr(type(config), "PRESETS", {}).get(preset, {})
        names = {item.name for item in fields(config)}
        unknown = set(table) - names
        if unknown:  # a typo in a preset table must not silently do nothing
            raise AttributeError(f"{type(config).__name__}.PRESETS['{preset}'] names unknown fields {sorted(unknown)}.")
        for name, value in table.items():
            if getattr(config, name) is None:
                setattr(config, name, value)
