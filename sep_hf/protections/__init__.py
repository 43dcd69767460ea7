"""Protections (SEP and the methods it is measured against), one module each, joined by a registry.

``register_protection(name, config_cls, transform_cls)`` adds a method; ``get_protection(name)``
returns its ``(config class, transform class)``. Adding a method is one module and one call.
"""

from __future__ import annotations

import warnings
from importlib import import_module

__all__ = ["register_protection", "get_protection", "list_protections"]

_REGISTRY: dict[str, tuple[type, type]] = {}
# Modules that register methods when imported (lazily, to keep `import sep_hf` light).
_MODULES = ("sep_hf.protections.sep",)


def register_protection(name: str, config_cls: type, transform_cls: type) -> None:
    if name in _REGISTRY and _REGISTRY[name] != (config_cls, transform_cls):
        warnings.warn(f"Overwriting protection '{name}' in the registry.", stacklevel=2)
    _REGISTRY[name] = (config_cls, transform_cls)


def _load_all() -> None:
    for module in _MODULES:
        import_module(module)


def get_protection(name: str) -> tuple[type, type]:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown protection '{name}'; choose one of {', '.join(list_protections())}.")
    return _REGISTRY[name]


def list_protections() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
