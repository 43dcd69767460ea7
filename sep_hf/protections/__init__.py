"""Protections (SEP and the methods it is measured against): one module each, registered by decorator.

Adding a method is one file, ``sep_hf/protections/x.py``::

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

from sep_hf.registry import Registry

__all__ = ["register_protection", "get_protection", "list_protections", "protection_arguments", "check_method_flags",
           "PROTECTIONS"]

PROTECTIONS = Registry("protection", __name__, "--method")
register_protection = PROTECTIONS.register


def get_protection(name: str) -> type:
    """The transform class of ``name``; ``a+b`` is the composition of ``a`` then ``b``."""
    if "+" in name:
        from sep_hf.protections.compose import composed

        return composed(name)
    return PROTECTIONS.get(name)


def list_protections() -> list[str]:
    return PROTECTIONS.names()


def protection_arguments() -> list[type]:
    """The distinct flag dataclasses of all registered methods (recipes/protect.py adds them to its parser)."""
    return PROTECTIONS.argument_classes()


def check_method_flags(method: str, parsed: list | tuple) -> None:
    """Refuse a flag of another method (``--method sep --craft_transforms jpeg`` would craft plain SEP
    and mislabel the run): every flag dataclass ``method`` does not read must be at its defaults.

    Raises ValueError naming the flag and the methods it belongs to.
    """
    from dataclasses import fields

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
