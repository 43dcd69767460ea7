"""Composed protections: ``--method a+b`` crafts ``b`` on the output of ``a``.

Each part is built from its own flags (``from_arguments``) and keeps its own budget: after every
part, the change it made to its input is checked against that part's L-inf budget (parts without
one, such as CUDA, are not norm-bounded). One dataset, one card stating every part.

Example: ``--method cuda+sep-fa-vr`` blurs each class with its private CUDA filter, then pushes
the blurred image towards another class's features within eps of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sep_hf.budget import Budget
from sep_hf.protect.base import ProtectionTransform, config_hash

__all__ = ["ComposedProtection", "composed"]


class ComposedProtection(ProtectionTransform):
    """The parts applied in order; ``parts`` are built transforms, ``names`` their method names."""

    part_names: tuple[str, ...] = ()
    part_classes: tuple[type[ProtectionTransform], ...] = ()

    def __init__(self, parts: list[ProtectionTransform], image_column: str, label_column: str,
                 return_stats: bool = False):
        super().__init__(image_column, label_column, return_stats)
        self.parts = parts
        self.name = "+".join(part.name for part in parts)

    @property
    def eps(self) -> float | None:
        return None  # the composition as a whole is bounded only if every part is: see describe()

    @classmethod
    def argument_classes(cls) -> set[type]:
        return set().union(*(part.argument_classes() for part in cls.part_classes))

    @classmethod
    def from_arguments(cls, context, name: str) -> ComposedProtection:
        parts = [part.from_arguments(context, name) for part, name in zip(cls.part_classes, cls.part_names)]
        return cls(parts, context.columns.image, context.columns.label, return_stats=True)

    @classmethod
    def check_arguments(cls, context, name: str) -> None:
        for part, part_name in zip(cls.part_classes, cls.part_names):
            part.check_arguments(context, part_name)

    def protect(self, images, labels, indices):
        for part in self.parts:
            protected = part.protect(images, labels, indices).to(images.device)
            if part.eps is not None:
                levels = ((protected - images).abs().amax() * 255).round().item() if images.numel() else 0
                budget = Budget.from_pixels(part.eps)
                if levels > budget.levels:
                    raise AssertionError(f"{part.name} changed a pixel by {levels:g}/255, beyond its budget {budget}.")
            images = protected
        return images

    def fingerprint(self) -> str:
        return config_hash("composed", [(part.name, part.fingerprint()) for part in self.parts])

    def extra_stats(self, protected: torch.Tensor, labels: torch.Tensor) -> dict[str, list]:
        return {name: values for part in self.parts for name, values in part.extra_stats(protected, labels).items()}

    def describe(self) -> dict:
        parts = [{"method": part.name, **part.describe()} for part in self.parts]
        return {"config": {"parts": [part["method"] for part in parts]}, "parts": parts, "eps": None,
                "budget": "per part: " + ", ".join(f"{part['method']} " + (f"{part['eps']}/255" if part["eps"] is not None
                                                                             else "not norm-bounded") for part in parts),
                "paper": {}}

    def card_lines(self, results: dict) -> list[str]:
        lines = [f"- composition `{self.name}`: each part is crafted on the output of the one before, and its "
                 "change is checked against its own budget"]
        return lines + [f"  {line}" for part in self.parts for line in part.card_lines(results)]


def composed(name: str, lookup: Callable[[str], type[ProtectionTransform]]) -> type[ComposedProtection]:
    """The composition class for ``a+b[+c...]``, every part a method that ``lookup`` (the registry) knows.

    Raises ValueError for an empty part, a single name, or (through ``lookup``) an unknown method.
    """
    names = tuple(part.strip() for part in name.split("+"))
    if len(names) < 2 or not all(names):
        raise ValueError(f"A composition is written 'a+b' with registered methods; got '{name}'.")
    parts = [lookup(part) for part in names]  # raises, listing the methods, on an unknown part
    attributes = {
        "part_names": names,
        "part_classes": tuple(parts),
        "protects_all_splits": all(part.protects_all_splits for part in parts),
        "extra_stat_features": {k: v for part in parts for k, v in part.extra_stat_features.items()},
        "needs_other_class": any(getattr(part, "needs_other_class", False) for part in parts),
    }
    return type(f"Composed[{name}]", (ComposedProtection,), attributes)
