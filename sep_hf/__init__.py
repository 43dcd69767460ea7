"""sep-hf: Self-Ensemble Protection for image datasets on the Hugging Face Hub.

The pipeline, one subpackage per stage (each with its ``job.py``, the function a recipe and the
``sep-hf`` command call):

1. ``data``    an owner's dataset, read as published (any image file, native resolution, bounded memory)
2. ``source``  train one model, keep its checkpoints: the self-ensemble
3. ``protect`` craft each image's protection with the ensemble (SEP, and CUDA / EM / REM to compare)
4. ``victim``  the appropriator's training (``defenses``: AT, RSE, JPEG, ...), measured on clean data

``publish`` is every stage's way out (dataset folders, cards, the Hub); ``models``, ``budget``,
``squeezes``, ``attacks``, ``seeding`` and ``utils`` are shared by the stages.

Public names are imported lazily, so ``python -m sep_hf.testing.hub`` and ``import sep_hf`` stay
light and do not import torch or the HF clients before the caller configured them.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointEnsemble": "sep_hf.protect.ensemble",
    "SEPConfig": "sep_hf.protect.methods.sep",
    "SEPTransform": "sep_hf.protect.methods.sep",
    "craft_sep": "sep_hf.protect.methods.sep",
    "SourceTrainingConfig": "sep_hf.source.recipe",
    "train_source": "sep_hf.source.train",
    "build_model": "sep_hf.models",
    "load_image_dataset": "sep_hf.data.load",
    "DatasetError": "sep_hf.data.load",
    "CheckpointError": "sep_hf.source.checkpoints",
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
