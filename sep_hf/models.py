"""Model registry: CIFAR-style timm registrations and ``build_model`` for any timm architecture.

Every model built here takes pixels in [0, 1]: per-channel normalization is a buffer inside
``ImageClassifier``, so attacks, protections and defenses never see normalized inputs. The number
of input channels is that of the normalization (``len(mean)``): a model for a grayscale dataset is
built with one-channel statistics and gets a one-channel stem (timm's ``in_chans``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from timm.models import build_model_with_cfg, register_model
from timm.models._hub import load_model_config_from_path  # timm's local-dir reader (not re-exported)
from transformers import TimmWrapperForImageClassification

__all__ = ["CifarResNet", "SmallNet", "ImageClassifier", "resize_to_model", "resize_matrix", "RaggedResize", "build_model", "list_cifar_models", "timm_model_args", "check_model_name",
           "pretrained_weights_name", "public_model_name", "hub_model_id", "pretrained_config",
           "load_pretrained_backbone", "zero_new_classifier"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class _TimmInterface:
    """The slice of timm's model API the product relies on (and TimmWrapper expects)."""

    num_classes: int
    num_features: int
    fc: nn.Module

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), _bn(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(_TimmInterface, nn.Module):
    """ResNet with a 3x3 stride-1 stem and no max-pool: the ResNet-18 of the SEP paper."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3,
                 width: int = 64, **kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = _bn(width)
        stages, in_planes = [], width
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))


class SmallNet(_TimmInterface, nn.Module):
    """A small VGG-style net for CPU runs (airbench's block: conv, pool, BN, GELU, conv, BN, GELU)."""

    def __init__(self, widths: Sequence[int] = (40, 80, 160), stem_width: int = 24, num_classes: int = 10,
                 in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False), _bn(stem_width), nn.GELU())
        blocks, in_width = [], stem_width
        for width in widths:
            blocks += [
                nn.Conv2d(in_width, width, 3, padding=1, bias=False), nn.MaxPool2d(2), _bn(width), nn.GELU(),
                nn.Conv2d(width, width, 3, padding=1, bias=False), _bn(width), nn.GELU(),
            ]
            in_width = width
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = nn.AdaptiveMaxPool2d(1)
        self.num_features = in_width
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def _cifar_cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None,
            "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "first_conv": "", "classifier": "fc", **kwargs}


default_cfgs = {
    "resnet18_cifar": _cifar_cfg(first_conv="conv1"),
    "smallnet_cifar": _cifar_cfg(first_conv="stem.0"),
}


def _create(cls, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """Through timm's builder, so the model carries its ``pretrained_cfg`` and ``hf-hub:`` / ``local-dir:``
    weights (a backbone exported with ``timm.models.save_for_hf``) load with ``timm.create_model``."""
    source = kwargs.get("pretrained_cfg")
    source = source.to_dict() if hasattr(source, "to_dict") else (source or {})
    if pretrained and not (source.get("hf_hub_id") or source.get("file")):
        raise ValueError(f"{variant} has no published pretrained weights; train it with recipes/train_source.py, "
                         "or load an exported one with hf-hub:org/name or a local folder.")
    return build_model_with_cfg(cls, variant, pretrained, kwargs_filter=("img_size",), **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18, CIFAR stem (3x3 conv, no max-pool), 11.2M parameters: the SEP paper's model."""
    return _create(CifarResNet, "resnet18_cifar", pretrained, **dict(dict(layers=(2, 2, 2, 2)), **kwargs))


@register_model
def smallnet_cifar(pretrained: bool = False, **kwargs) -> SmallNet:
    """Small fast net for CPU runs, 0.46M parameters."""
    return _create(SmallNet, "smallnet_cifar", pretrained, **dict(dict(widths=(40, 80, 160), stem_width=24), **kwargs))


def list_cifar_models() -> list[str]:
    """The names of the registered ``*_cifar`` architectures (32x32 stems)."""
    return sorted(default_cfgs)


def resize_to_model(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Float images (N, C, H, W) in [0, 1] resized to ``size`` = (H', W'): bilinear with antialiasing
    (``torch.nn.functional.interpolate(antialias=True)``), differentiable, a no-op at that size already.

    The one resize between a published image and a model: source training data, class means and
    crafting all use it, so a perturbation crafted at native resolution reaches the model as it was
    optimized (crafting differentiates through this function).
    """
    size = tuple(int(v) for v in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_matrix(length: int, size: int, device=None) -> torch.Tensor:
    """The 1-D operator of ``resize_to_model`` along one axis: (size, length), float32.

    Antialiased bilinear resizing is separable, so resizing an (H, W) image to (S, S') is
    ``resize_matrix(H, S) @ x @ resize_matrix(W, S').T`` (equal to ``interpolate`` to float rounding).
    """
    eye = torch.eye(length, device=device).view(length, 1, 1, length)
    return F.interpolate(eye, size=(1, size), mode="bilinear", antialias=True, align_corners=False).reshape(length, size).T


class RaggedResize:
    """``resize_to_model`` of images of different sizes held in one zero-padded canvas, as two batched
    matmuls (no per-image loop): canvas (N, C, Hmax, Wmax), image i in its top-left ``sizes[i]`` =
    (h_i, w_i) corner -> (N, C, H', W'). Differentiable; the gradient on the padding is exactly zero.
    Runs in float32 even under autocast (a bf16 resize would round the perturbation away)."""

    def __init__(self, sizes: torch.Tensor, canvas: Sequence[int], size: Sequence[int], device=None):
        operators = {}
        rows = torch.zeros(len(sizes), size[0], canvas[0], device=device)
        cols = torch.zeros(len(sizes), size[1], canvas[1], device=device)
        for i, (height, width) in enumerate(sizes.tolist()):
            for key in ((height, size[0]), (width, size[1])):
                if key not in operators:
                    operators[key] = resize_matrix(*key, device=device)
            rows[i, :, :height] = operators[(height, size[0])]
            cols[i, :, :width] = operators[(width, size[1])]
        self.rows, self.cols = rows.unsqueeze(1), cols.transpose(1, 2).unsqueeze(1)  # (N,1,H',Hmax), (N,1,Wmax,W')

    def __getitem__(self, index) -> RaggedResize:
        """The resize of a subset of the canvas's images (index: rows of the canvas)."""
        subset = object.__new__(RaggedResize)
        subset.rows, subset.cols = self.rows[index], self.cols[index]
        return subset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.rows @ (x.float() @ self.cols)


class ImageClassifier(nn.Module):
    """A timm model behind a per-channel normalization: input pixels in [0, 1], (N, C, H, W).

    Inputs of another size than the model's ``img_size`` are resized to it first (``resize_to_model``),
    so images of any native resolution can be fed, and differentiated through.

    ``features(x)`` returns the penultimate (pre-logits) features; ``head(features)`` the logits.
    ``config`` is everything needed to rebuild the architecture (saved with every checkpoint).
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float], config: dict):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.config = config
        size = config["img_size"]
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (resize_to_model(x, self.input_size) - self.mean) / self.std
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_classifier()(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]


def check_model_name(name: str) -> None:
    """Raise a ValueError for a name timm does not know, suggesting close matches."""
    if timm.is_model(name):
        return

    known = timm.list_models()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6) or timm.list_models(f"*{name.split('_')[0]}*")[:3]
    raise ValueError(f"Unknown model '{name}': timm has no such architecture. "
                     + (f"Did you mean {', '.join(close)}? " if close else "")
                     + f"CIFAR models: {', '.join(list_cifar_models())}; see timm.list_models('{name[:4]}*').")


def timm_model_args(name: str, img_size) -> dict:
    """Extra ``timm.create_model`` arguments for this input size: ``img_size`` for fixed-size models (ViTs)."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and getattr(pretrained_cfg, "fixed_input_size", False):
        return {"img_size": img_size}
    return {}


def build_model(
    name: str,
    num_classes: int,
    img_size: int | Sequence[int] = 32,
    mean: Sequence[float] | None = CIFAR10_MEAN,
    std: Sequence[float] | None = CIFAR10_STD,
    pretrained: bool = False,
    **model_kwargs,
) -> ImageClassifier:
    """Build any timm model (or a registered ``*_cifar`` one) for ``num_classes`` classes.

    Input channels: ``len(mean)`` (1 for grayscale data, whose ``channel_stats`` have one entry).
    Pretrained weights (``name`` a Hub repo or local folder, or a timm tag with ``pretrained``; see
    ``pretrained_weights_name``) load through timm with a new classifier; the normalization is then
    the one the weights were pretrained with (``mean``/``std`` ignored), and the saved config names
    the architecture, so checkpoints rebuild without the Hub.
    """
    weights = pretrained_weights_name(name, pretrained)
    if weights is not None:
        backbone = load_pretrained_backbone(weights, num_classes, **model_kwargs)
        name = backbone.pretrained_cfg["architecture"]
        mean, std = backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"]
    else:
        check_model_name(name)
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one entry per input channel, got {len(mean)} and {len(std)}.")
        kwargs = {**model_kwargs, **timm_model_args(name, img_size)}
        if len(mean) != 3:  # RGB passes nothing: timm's default, and the same models (and weights) as ever
            kwargs.setdefault("in_chans", len(mean))
        backbone = timm.create_model(name, num_classes=num_classes, **kwargs)
    config = {
        "model_name": name,
        "num_classes": num_classes,
        "img_size": img_size if isinstance(img_size, int) else list(img_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "model_kwargs": model_kwargs,
    }
    if weights is not None:
        config["pretrained_from"] = public_model_name(weights)
    return ImageClassifier(backbone, mean, std, config)


def model_from_config(config: dict) -> ImageClassifier:
    """Rebuild the architecture saved in a checkpoint record (no weights loaded)."""
    return build_model(
        config["model_name"], config["num_classes"], config["img_size"], config["mean"], config["std"],
        **config.get("model_kwargs", {}),
    )


PRETRAINED_SOURCES = ("hf-hub:", "local-dir:")


def pretrained_weights_name(model: str, pretrained: bool = False) -> str | None:
    """The ``timm.create_model`` name that loads ``model`` with pretrained weights; None: train from scratch.

    ``hf-hub:org/name`` and ``local-dir:/path`` pass through; an existing local folder becomes
    ``local-dir:<absolute path>``; any other ``org/name`` becomes ``hf-hub:org/name``; a plain timm
    name (``resnet18.a1_in1k``) loads timm's own pretrained tag if ``pretrained``.
    """
    if model.startswith(PRETRAINED_SOURCES):
        return model
    if Path(model).is_dir():
        return f"local-dir:{Path(model).resolve()}"
    if "/" in model:
        return f"hf-hub:{model}"
    return model if pretrained else None


def public_model_name(model: str) -> str:
    """What a card may show of ``--model``: a local folder by its folder name, never by its path."""
    if model.startswith("local-dir:") or Path(model).is_dir():
        return Path(model.removeprefix("local-dir:")).name
    return model


def hub_model_id(model: str) -> str | None:
    """The Hub repo id of a pretrained ``--model`` (a card's ``base_model``), None for a local folder or timm tag."""
    if model.startswith("hf-hub:"):
        return model.removeprefix("hf-hub:").split("@")[0]
    if "/" in model and not model.startswith("local-dir:") and not Path(model).is_dir():
        return model
    return None


def _cannot_load(model: str, err: Exception) -> ValueError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"--model {public_model_name(model)}: timm cannot load pretrained weights from it ({reason}). "
                      "Pass a timm name with --pretrained (resnet18.a1_in1k), a Hub repo of a timm model "
                      "(hf-hub:org/name) or a local folder holding its config.json and weights.")


def pretrained_config(model: str) -> dict:
    """The ``pretrained_cfg`` (``input_size``, ``mean``, ``std``, ``label_names``, ...) of a pretrained
    ``model`` (a ``pretrained_weights_name``), read from its config.json without loading weights.

    Raises ValueError (one line) for a repo, folder or tag that does not exist or is not a timm model.
    """
    source, _, identifier = model.partition(":") if model.startswith(PRETRAINED_SOURCES) else ("", "", model)
    try:
        if source == "hf-hub":
            config, architecture, _ = timm.models.load_model_config_from_hf(identifier)
        elif source == "local-dir":
            config, architecture, _ = load_model_config_from_path(identifier)
        else:
            found = timm.models.get_pretrained_cfg(model)
            if found is None:
                raise ValueError(f"timm has no pretrained tag '{model}'")
            config, architecture = found.to_dict(), model.split(".")[0]
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # Hub 404s are OSErrors (HTTPError)
        raise _cannot_load(model, err) from err
    return {**config, "architecture": architecture}


def load_pretrained_backbone(model: str, num_classes: int = 0, **kwargs) -> nn.Module:
    """A timm model with pretrained weights, through timm's own loader (``timm.create_model(pretrained=True)``).

    ``model`` is any name ``pretrained_weights_name`` returns. The classifier is new (``num_classes``
    outputs; 0: no head) whenever the checkpoint's class count differs, and starts at zero
    (``zero_new_classifier``). The
    preprocessing the weights expect (``input_size``, ``mean``, ``std``, ``label_names``) is the
    returned model's ``pretrained_cfg``. Raises ValueError (one line) for a repo, folder or tag that
    cannot be loaded.
    """
    try:
        config = _hub_config(model)
        if "TimmWrapper" in " ".join(config.get("architectures") or []):
            backbone = _timm_from_transformers(model, config, num_classes)
            pretrained_classes = len(config.get("id2label") or {}) or config.get("num_labels")
        else:
            backbone = timm.create_model(model, pretrained=True, num_classes=num_classes, **kwargs)
            pretrained_classes = backbone.pretrained_cfg.get("num_classes")
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise _cannot_load(model, err) from err
    if num_classes and num_classes != pretrained_classes:
        zero_new_classifier(backbone)
    return backbone


def zero_new_classifier(backbone: nn.Module) -> None:
    """Zero a new classifier's weights and bias (BiT's fine-tuning practice): it starts at uniform predictions.

    Why: timm initializes EfficientNet's head with range 1/sqrt(num_classes); on ImageNet features (1,280 of
    them, up to 6 after ReLU6) that gives logits of about 10 and a first loss of 17.6 on CIFAR-10, whose
    gradients (norm 194) wreck the pretrained backbone in the first steps: tf_efficientnet_lite2 fine-tuned on
    2,500 CIFAR-10 images at 64 px, 2 epochs, SGD lr 0.01, reached 0.384 with timm's head and 0.584 with a zero one.
    """
    head = backbone.get_classifier()
    for parameter in head.parameters():
        nn.init.zeros_(parameter)


def _hub_config(model: str) -> dict:
    """config.json of an ``hf-hub:`` / ``local-dir:`` model ({} for a timm tag)."""

    source, _, identifier = model.partition(":") if model.startswith(PRETRAINED_SOURCES) else ("", "", model)
    if source == "local-dir":
        return json.loads((Path(identifier) / "config.json").read_text())
    if source == "hf-hub":

        repo_id, _, revision = identifier.partition("@")
        return json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision or None)).read_text())
    return {}


def _timm_from_transformers(model: str, config: dict, num_classes: int) -> nn.Module:
    """The timm model inside a transformers ``TimmWrapperForImageClassification`` repo (a victim pushed by
    sep-hf, or any Trainer fine-tune of a timm model), with its preprocessing as ``pretrained_cfg``."""

    repo = model.partition(":")[2]
    repo, _, revision = repo.partition("@") if model.startswith("hf-hub:") else (repo, "", "")
    wrapper = TimmWrapperForImageClassification.from_pretrained(repo, revision=revision or None, num_labels=num_classes or 1,
                                                                ignore_mismatched_sizes=True)
    backbone = wrapper.timm_model
    if num_classes == 0:
        backbone.reset_classifier(0)
    labels = config.get("id2label") or {}
    backbone.pretrained_cfg = {**backbone.pretrained_cfg, **(config.get("pretrained_cfg") or {}),
                               "architecture": config["architecture"],
                               "label_names": [labels[k] for k in sorted(labels, key=int)] if labels else None}
    if model.startswith("hf-hub:"):
        backbone.pretrained_cfg["hf_hub_id"] = repo
    return backbone
