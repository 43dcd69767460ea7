"""Protections (SEP and the methods it is measured against), one module each, joined by a registry.

``register_protection(name, config_cls, transform_cls, arguments_cls=None)`` adds a method;
``get_protection(name)`` returns its ``(config class, transform class)``. A method with command-line
flags of its own (``--cuda_key``, ...) registers an ``arguments_cls`` dataclass, which
recipes/protect.py adds to its parser. Adding a method is one module, one registry call and its
module name in ``_MODULES``.
"""

from __future__ import annotations

import warnings
from importlib import import_module

__all__ = ["register_protection", "get_protection", "list_protections", "protection_arguments", "arguments_for"]

_REGISTRY: dict[str, tuple[type, type]] = {}
_ARGUMENTS: dict[str, type] = {}
# Modules that register methods when imported (lazily, to keep `import sep_hf` light).
_MODULES = ("sep_hf.protections.sep", "sep_hf.protections.cuda", "sep_hf.protections.em")


def register_protection(name: str, config_cls: type, transform_cls: type, arguments_cls: type | None = None) -> None:
    if name in _REGISTRY and _REGISTRY[name] != (config_cls, transform_cls):
        warnings.warn(f"Overwriting protection '{name}' in the registry.", stacklevel=2)
    _REGISTRY[name] = (config_cls, transform_cls)
    if arguments_cls is not None:
        _ARGUMENTS[name] = arguments_cls


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


def protection_arguments() -> list[type]:
    """The distinct argument dataclasses of all registered methods, in a stable order."""
    _load_all()
    return sorted(set(_ARGUMENTS.values()), key=lambda cls: cls.__name__)


def arguments_for(name: str, parsed: list) -> object | None:
    """The parsed instance of ``name``'s argument dataclass among ``parsed`` (None if it has none)."""
    wanted = _ARGUMENTS.get(name)
    return next((item for item in parsed if type(item) is wanted), None) if wanted else None
