"""Victim defenses: what an appropriator may do to learn from protected data anyway. One module each.

Adding a defense is one file, ``sep_hf/defenses/x.py``::

    @dataclass
    class XArguments:                 # its flags, prefixed with its name (--x_strength ...)
        x_strength: float = 1.0

    @register_defense("x")
    class X(Defense):
        arguments = XArguments
        def prepare_training_images(self, images): ...   # and/or the other hooks of Defense

and ``--defense x`` (with its flags) appears in ``recipes/train_victim.py --help`` and in the matrix.
"""

from __future__ import annotations

from dataclasses import fields

from sep_hf.utils.registry import Registry

__all__ = ["register_defense", "get_defense", "list_defenses", "defense_arguments", "build_defense", "DEFENSES"]

DEFENSES = Registry("defense", __name__, "--defense")
register_defense = DEFENSES.register


def get_defense(name: str) -> type:
    """The registered defense class of ``name``; ValueError listing the defenses for an unknown one."""
    return DEFENSES.get(name)


def list_defenses() -> list[str]:
    """The names of every registered defense, sorted."""
    return DEFENSES.names()


def defense_arguments() -> list[type]:
    """The distinct flag dataclasses of all registered defenses (recipes/train_victim.py parses them)."""
    return DEFENSES.argument_classes()


def build_defense(name: str, parsed: list | tuple = ()):
    """The defense ``name``, configured from its flag dataclass among ``parsed`` (defaults if absent).

    A flag of another defense would silently do nothing and mislabel the run, so it is an error.
    """
    cls = get_defense(name)
    given = {type(item): item for item in parsed}
    for other in defense_arguments():
        if other is cls.arguments or other not in given:
            continue
        default = other()
        for item in fields(other):
            if getattr(given[other], item.name) != getattr(default, item.name):
                owners = [n for n in list_defenses() if get_defense(n).arguments is other]
                raise ValueError(f"--{item.name} only applies to --defense {owners[0]}; drop it or pass "
                                 f"--defense {owners[0]}.")
    arguments = given.get(cls.arguments) or (cls.arguments() if cls.arguments else None)
    return cls(arguments)
