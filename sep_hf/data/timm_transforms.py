"""A pretrained backbone's view of the images: timm's own transforms for its weights, as an appropriator runs them
(pretrained victims, the protect run's audit).

``timm.data.resolve_data_config`` reads the weights' ``pretrained_cfg`` (input size, interpolation, crop_pct,
mean/std) and ``timm.data.create_transform`` builds what timm's training script uses: RandomResizedCrop,
flip and colour jitter at the input size for training, resize + centre crop for evaluation. ``input_size``
overrides the weights' size (``--image_size``: a CPU budget). Victims trained from scratch keep sep-hf's
batched crop-and-flip at the data's size (``source.augment``), the source's recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from timm.data import create_transform, resolve_data_config
from torchvision.transforms.v2.functional import to_pil_image

__all__ = ["TimmPreprocessing", "timm_preprocessing"]


@dataclass
class TimmPreprocessing:
    """The training and evaluation transforms (uint8 CHW tensor in, normalized float tensor out) and the
    ``data_config`` they were built from (saved in results.json and the model's config)."""

    train: Callable[[torch.Tensor], torch.Tensor]
    eval: Callable[[torch.Tensor], torch.Tensor]
    data_config: dict

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.data_config["input_size"][1:])


def _on_uint8(transform) -> Callable[[torch.Tensor], torch.Tensor]:
    # timm's transforms take PIL images; a grey image reaches an RGB backbone as grey on R, G and B
    return lambda image: transform(to_pil_image(image).convert("RGB"))


def timm_preprocessing(timm_model: torch.nn.Module, input_size: Sequence[int] | None = None) -> TimmPreprocessing:
    """timm's transforms for ``timm_model``'s pretrained weights, at ``input_size`` (H, W) when given."""
    data_config = resolve_data_config(model=timm_model)
    if input_size is not None:
        data_config["input_size"] = (data_config["input_size"][0], *input_size)
    return TimmPreprocessing(train=_on_uint8(create_transform(**data_config, is_training=True)),
                             eval=_on_uint8(create_transform(**data_config, is_training=False)),
                             data_config=data_config)
