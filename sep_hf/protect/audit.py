"""The protect run's self-audit: what a linear probe on a public ImageNet backbone learns from the protected images.

The cheapest realistic appropriator downloads a backbone and fits a linear classifier on its features. The audit
does exactly that twice, on the protected training images and on their clean originals, and evaluates both on
the clean evaluation images: the owner reads the realistic figure beside the clean one before publishing.
Features: the backbone frozen (eval mode) on timm's evaluation transform for its weights (resize + centre crop,
``data.timm_transforms``) at ``input_size``; classifier: multinomial logistic regression on standardized features,
fitted full-batch with L-BFGS (deterministic, seconds for 10,000 images). A backbone that cannot be loaded
(offline, a typo) is a "not audited" reason, never a failed run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi

from sep_hf.data.timm_transforms import timm_preprocessing
from sep_hf.data.view import TrainingData
from sep_hf.models import load_pretrained_backbone
from sep_hf.utils.logging import get_logger

__all__ = ["probe_audit", "backbone_features", "fit_linear_probe", "PROBE_WEIGHT_DECAY", "PROBE_STEPS"]

logger = get_logger(__name__)

PROBE_WEIGHT_DECAY = 1e-3  # on standardized features: a mild L2, the usual probe regularization
PROBE_STEPS = 200  # L-BFGS iterations: the loss has flattened well before on 1,280 features


@torch.inference_mode()
def backbone_features(backbone, transform, images, batch_size: int = 250, device="cpu", bf16: bool = False) -> torch.Tensor:
    """Pooled features (N, D) of uint8 images (a tensor or ``ImageRows``) through ``transform`` (uint8 CHW in)."""
    out = []
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        x = torch.stack([transform(image) for image in batch]).to(device).contiguous(memory_format=torch.channels_last)
        with autocast:
            out.append(backbone(x).float().cpu())
    return torch.cat(out)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight_decay: float = PROBE_WEIGHT_DECAY, steps: int = PROBE_STEPS):
    """Multinomial logistic regression on standardized features; returns a function features -> logits."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    weight = torch.zeros(features.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + weight_decay * weight.square().sum() / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda f: ((f - mean) / std) @ weight + bias


def probe_audit(model: str, protected_images, clean: TrainingData, input_size: Sequence[int] | None = None,
                device="cpu", bf16: bool = False) -> dict:
    """The probe trained on ``protected_images`` and on ``clean.train_images`` (the same rows, clean), each
    evaluated on ``clean.eval_images``. Returns results.json's ``audit``: ``audited`` False with a one-line
    ``reason`` when the backbone cannot be loaded."""
    start = time.perf_counter()
    try:
        if model.startswith("hf-hub:"):  # one request, no retries: offline, the download's back-off takes 30 s to give up
            repo_id, _, revision = model.removeprefix("hf-hub:").partition("@")
            HfApi().repo_info(repo_id, revision=revision or None)
        backbone = load_pretrained_backbone(model, num_classes=0)
    except Exception as err:  # noqa: BLE001 - whatever stops the download (HTTP, network, a bad folder) is the reason
        reason = f"{model} could not be loaded ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        logger.warning("Not audited: %s", reason)
        return {"audited": False, "model": model, "reason": reason}
    backbone = backbone.eval().to(device).to(memory_format=torch.channels_last)
    preprocessing = timm_preprocessing(backbone, tuple(input_size) if input_size is not None else None)
    features = {name: backbone_features(backbone, preprocessing.eval, images, device=device, bf16=bf16)
                for name, images in (("protected", protected_images), ("clean", clean.train_images),
                                     ("eval", clean.eval_images))}
    num_classes = len(clean.class_names)
    accuracy = {}
    for name in ("clean", "protected"):
        probe = fit_linear_probe(features[name], clean.train_labels, num_classes)
        accuracy[name] = float((probe(features["eval"]).argmax(1) == clean.eval_labels).float().mean())
    seconds = time.perf_counter() - start
    num_images = 2 * len(clean.train_labels) + len(clean.eval_labels)
    return {
        "audited": True, "model": model, "input_size": list(preprocessing.input_size),
        "clean_accuracy": accuracy["clean"], "protected_accuracy": accuracy["protected"],
        "num_train": len(clean.train_labels), "num_eval": len(clean.eval_labels), "eval_split": clean.eval_split,
        "probe": f"logistic regression on frozen features (L-BFGS, {PROBE_STEPS} iterations, L2 {PROBE_WEIGHT_DECAY:g}, "
                 "standardized features; timm's evaluation transform)",
        "precision": "bf16" if bf16 else "fp32",
        "seconds": seconds, "seconds_per_1000_images": 1000 * seconds / num_images,
    }
