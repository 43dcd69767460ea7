"""Logging: accelerate's multi-process logger, so a run on N processes prints each line once.

``get_logger(__name__)`` is ``accelerate.logging.get_logger`` (messages from the main process only,
``main_process_only=False`` to log from every process) that also works before any accelerate state
exists: a library function called outside a run (a test, a notebook) logs as a plain logger.
"""

from __future__ import annotations

import logging

from accelerate.logging import MultiProcessAdapter
from accelerate.state import PartialState

__all__ = ["get_logger", "setup_logging"]


class _Logger(MultiProcessAdapter):
    def log(self, level, msg, *args, **kwargs):
        if PartialState._shared_state:
            super().log(level, msg, *args, **kwargs)
            return
        kwargs.pop("main_process_only", None)  # one process: nothing to choose
        kwargs.pop("in_order", None)
        if self.isEnabledFor(level):
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> _Logger:
    """The logger of module ``name`` (see the module docstring)."""
    return _Logger(logging.getLogger(name), {})


def setup_logging() -> None:
    """What a command configures once: timestamps, sep_hf at INFO, the libraries at WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("sep_hf").setLevel(logging.INFO)
