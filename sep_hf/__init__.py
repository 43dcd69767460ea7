"""sep-hf: Self-Ensemble Protection for image datasets on the Hugging Face Hub.

Public names are imported lazily, so ``python -m sep_hf.testing.hub`` and ``import sep_hf`` stay
light and do not import torch or the HF clients before the caller configured them.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointEnsemble": "sep_hf.ensemble",
    "SEPConfig": "sep_hf.protections.sep",
    "SEPTransform": "sep_hf.protections.sep",
    "craft_sep": "sep_hf.protections.sep",
    "SourceTrainingConfig": "sep_hf.training",
    "train_source": "sep_hf.training",
    "build_model": "sep_hf.models",
    "load_image_dataset": "sep_hf.data",
    "DatasetError": "sep_hf.data",
    "CheckpointError": "sep_hf.checkpoints",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sep_hf' has no attribute '{name}'")


def __dir__():
    return __all__
