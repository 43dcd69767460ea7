"""Stage 3 of 4, protect: craft the protection of every image and publish the protected dataset.

``ensemble.py`` loads the self-ensemble (K checkpoints), ``base.py`` is the contract of a protection
and its ``Dataset.map`` adapter, ``eot.py`` the differentiable views of an appropriator's squeezes,
``compose.py`` ``--method a+b``, ``job.py`` the ``protect`` job; ``methods/`` holds the registered
protections (SEP and the methods it is measured against), one module each, registered by decorator.

Adding a method is one file, ``sep_hf/protect/methods/x.py``::

    @register_protection("x")
    class XTransform(ProtectionTransform):
        arguments = XArguments            # its flags (and their preset values), or None
        @classmethod
        def from_arguments(cls, context): ...
        def protect(self, images, labels, indices): ...
        def fingerprint(self): ...

and ``--method x`` appears in ``recipes/protect.py --help``, on the card and in the matrix.
``--method a+b`` composes registered methods (``compose.py``).
"""

from __future__ import annotations

from dataclasses import fields
from functools import cache

from sep_hf.protect.compose import composed
from sep_hf.utils.registry import Registry

__all__ = ["register_protection", "get_protection", "list_protections", "protection_arguments", "check_method_flags",
           "PROTECTIONS"]

PROTECTIONS = Registry("protection", "sep_hf.protect.methods", "--method")
register_protection = PROTECTIONS.register


def get_protection(name: str) -> type:
    """The transform class of ``name``; ``a+b`` is the composition of ``a`` then ``b``.

    Raises ValueError naming the registered methods for an unknown name.
    """
    return _composition(name) if "+" in name else PROTECTIONS.get(name)


@cache
def _composition(name: str) -> type:
    return composed(name, PROTECTIONS.get)  # one class per name: its fingerprint and describe() stay stable


def list_protections() -> list[str]:
    """The names of every registered protection, sorted (compositions ``a+b`` are not listed)."""
    return PROTECTIONS.names()


def protection_arguments() -> list[type]:
    """The distinct flag dataclasses of all registered methods (recipes/protect.py adds them to its parser)."""
    return PROTECTIONS.argument_classes()


def check_method_flags(method: str, parsed: list | tuple) -> None:
    """Refuse a flag of another method (``--method sep --craft_transforms jpeg`` would craft plain SEP
    and mislabel the run): every flag dataclass ``method`` does not read must be at its defaults.

    Raises ValueError naming the flag and the methods it belongs to.
    """
    used = get_protection(method).argument_classes()
    for item in parsed:
        cls = type(item)
        if cls in used:
            continue
        default = cls()
        for field in fields(cls):
            if getattr(item, field.name) != getattr(default, field.name):
                owners = [name for name in list_protections() if cls in get_protection(name).argument_classes()]
                raise ValueError(f"--{field.name} only applies to --method {' | '.join(owners)}, not {method}; drop it "
                                 f"or pass --method {owners[0]}.")
