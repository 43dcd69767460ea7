"""Checks of flag values shared by the flag dataclasses (``__post_init__``: at parsing, before any compute).

A ``.json`` / ``.yaml`` argument file, or the Python API, can hold 0, -1, 2.5 or ``true`` where
argparse's ``type=int`` would have refused them; a size like that fails only after compute otherwise
(``--shard_size 0``: a division by zero once crafting is done).
"""

from __future__ import annotations

__all__ = ["whole_number"]


def whole_number(value, flag: str, minimum: int = 1):
    """``value`` if it is a whole number >= ``minimum``, else ValueError naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise ValueError(f"{flag} must be {kind}, got {value!r}.")
    return value
