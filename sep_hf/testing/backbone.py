"""A stand-in for public pretrained weights: a source checkpoint exported as an ordinary timm model repo.

No ImageNet weights can be fetched offline, so tests and ``bench/pretrained_appropriator.py`` pretrain
a backbone on data the data owner does not publish and save it the way timm publishes models
(``timm.models.save_for_hf``: config.json with ``architecture``, ``label_names`` and the
``pretrained_cfg`` it was trained with, plus model.safetensors). An appropriator then loads it
exactly as a public checkpoint: ``timm.create_model("hf-hub:org/name", pretrained=True)``, or
``recipes/train_victim.py --model hf-hub:org/name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sep_hf.models import ImageClassifier, model_from_config
from sep_hf.source.checkpoints import list_checkpoints

__all__ = ["export_timm_backbone", "export_source_checkpoint"]


def export_timm_backbone(model: ImageClassifier, folder: str | Path, label_names: Sequence[str],
                         card: str | None = None) -> Path:
    """Save ``model``'s timm backbone (with its classifier) to ``folder`` as a timm Hub model folder.

    ``pretrained_cfg`` records the normalization (``mean``, ``std`` in [0, 1] units) and
    ``input_size`` (C, H, W) the model was trained with, and ``label_names`` the classes of its
    classifier, in order. ``card``: README.md text (a short default otherwise). Returns ``folder``.
    """
    from timm.models import save_for_hf

    if len(label_names) != model.num_classes:
        raise ValueError(f"{len(label_names)} label names for a {model.num_classes}-class model.")
    backbone = model.backbone
    backbone.pretrained_cfg = {**backbone.pretrained_cfg, "mean": tuple(model.config["mean"]),
                               "std": tuple(model.config["std"]), "num_classes": model.num_classes,
                               "input_size": (len(model.config["mean"]), *model.input_size), "crop_pct": 1.0}
    folder = Path(folder)
    save_for_hf(backbone, folder, model_config={"label_names": list(label_names)}, safe_serialization=True)
    (folder / "README.md").write_text(card or f"---\nlibrary_name: timm\ntags: [image-classification, timm]\n---\n\n"
                                              f"# {folder.name}\n\nA `{model.config['model_name']}` pretrained on "
                                              f"{', '.join(label_names)}.\n")
    return folder


def export_source_checkpoint(source_dir: str | Path, folder: str | Path, label_names: Sequence[str] | None = None,
                             card: str | None = None) -> Path:
    """The last checkpoint of a ``recipes/train_source.py`` run, exported by ``export_timm_backbone``
    (``label_names``: default, the run's class names)."""
    checkpoints = list_checkpoints(source_dir)
    if not checkpoints:
        raise ValueError(f"{source_dir} holds no checkpoint of recipes/train_source.py.")
    last = checkpoints[-1]
    model = model_from_config(last.record["model"])
    model.load_state_dict(last.load_state_dict())
    return export_timm_backbone(model, folder, label_names or last.record["class_names"], card)
