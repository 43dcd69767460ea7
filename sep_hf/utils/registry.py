"""Registries of plug-ins (protections, defenses): a module registers its class by decorator.

A ``Registry`` is bound to a package; the first lookup imports every module of that package
(``pkgutil``), so adding ``sep_hf/protect/methods/x.py`` or ``sep_hf/defenses/x.py`` is the whole
change: nothing lists module names. Modules outside the package register the same way when the
environment variable ``SEP_HF_PLUGINS`` names them (comma-separated import paths).
"""

from __future__ import annotations

import os
import pkgutil
import warnings
from importlib import import_module

__all__ = ["Registry", "PLUGINS_ENV"]

PLUGINS_ENV = "SEP_HF_PLUGINS"


class Registry:
    """name -> class, filled by ``@registry.register("name", ...)`` in the plug-in modules."""

    def __init__(self, kind: str, package: str, flag: str):
        self.kind, self.package, self.flag = kind, package, flag
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, *names: str):
        """Class decorator: ``@register("sep", "sep-fa")`` registers the class under every name."""

        def decorate(cls: type) -> type:
            for name in names:
                previous = self._classes.get(name)
                if previous is not None and previous.__qualname__ != cls.__qualname__:
                    warnings.warn(f"Overwriting {self.kind} '{name}' in the registry.", stacklevel=2)
                self._classes[name] = cls
            cls.registered_names = tuple(names)
            return cls

        return decorate

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                import_module(f"{self.package}.{module.name}")
        for name in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
            import_module(name)

    def get(self, name: str) -> type:
        self.load()
        if name not in self._classes:
            raise ValueError(f"Unknown {self.kind} '{name}'; choose one of {', '.join(self.names())} ({self.flag}).")
        return self._classes[name]

    def names(self) -> list[str]:
        self.load()
        return sorted(self._classes)

    def classes(self) -> list[type]:
        """Distinct registered classes, in a stable order."""
        self.load()
        return sorted(set(self._classes.values()), key=lambda cls: (cls.__module__, cls.__qualname__))

    def argument_classes(self) -> list[type]:
        """The distinct flag dataclasses (``arguments`` attribute) of the registered classes."""
        found = {cls.arguments for cls in self.classes() if getattr(cls, "arguments", None) is not None}
        return sorted(found, key=lambda cls: (cls.__module__, cls.__qualname__))
