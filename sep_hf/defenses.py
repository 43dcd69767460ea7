"""Training-time defenses of a victim: what an appropriator may do to learn from protected data anyway.

A defense is a small class with hooks that ``sep_hf.victims`` calls at fixed points of one
Trainer loop, so every defense works with any timm model and new ones (e.g. augmentation-based)
are one class and one ``register_defense(name, cls)`` call:

- ``prepare_training_images(images)``: once before training, on the uint8 TRAINING images only
  (the evaluation split is never touched): JPEG recompression, grayscale.
- ``training_inputs(trainer, pixel_values, labels)``: every training step, on the augmented,
  normalized batch (``trainer.to_pixels`` / ``trainer.to_normalized`` convert): PGD examples.
- ``wrap_model(model)``: once, on the ``TimmWrapperForImageClassification``, leaving its parameters
  (names and values) untouched so the saved checkpoint loads with ``AutoModelForImageClassification``.
- ``eval_logits(model, pixel_values)``: every evaluation batch: RSE's ensemble of noise draws.
- ``describe()``: the settings written to results.json and shown on the cards.

Budgets are in 1/255 like every budget of the product. The flags live on
``sep_hf.victims.VictimTrainingConfig``; each class names its own in ``flags``.
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Defense",
    "AdversarialTraining",
    "RandomSelfEnsemble",
    "JPEGRecompression",
    "Grayscale",
    "register_defense",
    "get_defense",
    "list_defenses",
    "build_defense",
    "pgd_linf",
    "frozen_buffers",
    "add_rse_noise",
    "RSENoise",
    "ensemble_log_probs",
    "jpeg_recompress",
    "to_grayscale",
]

_REGISTRY: dict[str, type["Defense"]] = {}
_CHUNK = 4096  # images per batched op in the one-off image transforms: bounded memory at any size


def register_defense(name: str, cls: type["Defense"]) -> None:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        warnings.warn(f"Overwriting defense '{name}' in the registry.", stacklevel=2)
    _REGISTRY[name] = cls


def list_defenses() -> list[str]:
    """Registered names, in registration order (``none`` first)."""
    return list(_REGISTRY)


def get_defense(name: str) -> type["Defense"]:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown defense '{name}'; choose one of {', '.join(list_defenses())} (--defense).")
    return _REGISTRY[name]


def build_defense(config) -> "Defense":
    """The defense ``config.defense`` names, configured from ``config``'s flags."""
    return get_defense(config.defense)(config)


class Defense:
    """Standard training: every hook is the identity. Subclasses override the hooks they need."""

    name = "none"
    flags: tuple[str, ...] = ()  # the VictimTrainingConfig fields this defense reads

    def __init__(self, config=None):
        self.config = config

    def prepare_training_images(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def training_inputs(self, trainer, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pixel_values

    def wrap_model(self, model):
        return model

    def eval_logits(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    def describe(self) -> dict:
        return {}


# ----------------------------------------------------------------------------------------------
# PGD adversarial training


@contextmanager
def frozen_buffers(model: nn.Module):
    """Restore every buffer (BatchNorm running statistics, counters) on exit."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def pgd_linf(loss_fn, pixels: torch.Tensor, labels: torch.Tensor, eps: float, step_size: float, steps: int,
             random_start: bool = True) -> torch.Tensor:
    """L-inf PGD ascent on ``loss_fn(pixels, labels)`` in [0, 1] pixel space (budgets in [0, 1] units).

    Returns pixels within ``eps`` of ``pixels`` and inside [0, 1]. Only the input gradient is
    computed (``autograd.grad``): parameters' ``.grad`` are left alone.
    """
    pixels = pixels.detach()
    lower, upper = (pixels - eps).clamp(min=0.0), (pixels + eps).clamp(max=1.0)
    adversarial = pixels
    if random_start:
        adversarial = pixels + torch.empty_like(pixels).uniform_(-eps, eps)
    adversarial = adversarial.clamp(lower, upper)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(adversarial, labels), adversarial)
        adversarial = (adversarial.detach() + step_size * grad.sign()).clamp(lower, upper)
    return adversarial.detach()


class AdversarialTraining(Defense):
    """PGD adversarial training: train on L-inf PGD examples of every augmented batch.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
    https://arxiv.org/abs/1706.06083. Defaults: eps 4/255 (8/255 with ``--at_eps 8``), 10 steps of
    eps/4, uniform random start, cross-entropy without label smoothing.

    The attack runs with the model in TRAIN mode, as in Madry's code: the examples maximize the
    very loss the step then minimizes (batch statistics of the batch being attacked), and a model
    early in training has meaningless running statistics, so an eval-mode attack would target a
    different function. Madry's BatchNorm updated its moving averages only in the training op, so
    the 10 attack passes must not move them either: every buffer is snapshotted and restored
    around the attack (``frozen_buffers``), and only the final training forward updates them.
    """

    name = "at"
    flags = ("at_eps", "at_steps", "at_step_size", "at_random_start")

    def __init__(self, config):
        super().__init__(config)
        self.eps = config.at_eps
        self.steps = config.at_steps
        self.step_size = config.at_step_size if config.at_step_size is not None else config.at_eps / 4
        self.random_start = config.at_random_start

    def training_inputs(self, trainer, pixel_values, labels):
        # trainer.model is the unwrapped model: a DDP wrapper expects a backward after each forward.
        model = trainer.model

        def loss_fn(pixels, targets):
            normalized = trainer.to_normalized(pixels).contiguous(memory_format=torch.channels_last)
            # summed: each example's gradient does not shrink with the batch size
            return F.cross_entropy(model(pixel_values=normalized).logits.float(), targets, reduction="sum")

        with frozen_buffers(model):
            adversarial = pgd_linf(loss_fn, trainer.to_pixels(pixel_values), labels, self.eps / 255,
                                   self.step_size / 255, self.steps, self.random_start)
        return trainer.to_normalized(adversarial)

    def describe(self) -> dict:
        return {"eps": self.eps, "steps": self.steps, "step_size": self.step_size, "random_start": self.random_start,
                "norm": "Linf", "units": "1/255",
                "attack_mode": "train (batch statistics; running statistics frozen during the attack)"}


# ----------------------------------------------------------------------------------------------
# Random Self-Ensemble


class RSENoise:
    """Gaussian noise before every ``nn.Conv2d`` of a model, via forward pre-hooks (``remove()`` undoes it).

    Hooks change no parameter and no state_dict key, and work on any architecture. The noise is
    active in training and evaluation alike (it is the defense, not a regularizer).
    """

    def __init__(self, model: nn.Module, init_std: float, inner_std: float, input_std=None):
        convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
        if not convs:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d: RSE adds its noise before convolutions.")
        first = convs[0]  # first in module order: the stem of timm models, which sees the image
        first_std = torch.as_tensor(init_std, dtype=torch.float32)
        if input_std is not None and len(input_std) == first.in_channels:
            # The image reaches the stem normalized; dividing by the processor's std puts the
            # first noise in pixel units ([0, 1] images), where the paper's 0.2 is defined.
            first_std = init_std / torch.tensor(input_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.num_layers = len(convs)
        self.handles = [first.register_forward_pre_hook(self._hook(first_std))]
        self.handles += [conv.register_forward_pre_hook(self._hook(torch.tensor(inner_std))) for conv in convs[1:]]

    @staticmethod
    def _hook(std: torch.Tensor):
        def add_noise(module, args):
            x = args[0]
            return (x + torch.randn_like(x) * std.to(x.device, x.dtype), *args[1:])

        return add_noise

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def add_rse_noise(model: nn.Module, init_std: float = 0.2, inner_std: float = 0.1, input_std=None) -> RSENoise:
    return RSENoise(model, init_std, inner_std, input_std)


def ensemble_log_probs(model, pixel_values: torch.Tensor, draws: int) -> torch.Tensor:
    """log of the mean softmax over ``draws`` noisy forwards (argmax = RSE's sum of softmaxes)."""
    log_probs = torch.stack([F.log_softmax(model(pixel_values=pixel_values).logits.float(), dim=-1)
                             for _ in range(draws)])
    return torch.logsumexp(log_probs, dim=0) - math.log(draws)


class RandomSelfEnsemble(Defense):
    """Random Self-Ensemble: noise layers before every convolution, ensembled over noise draws.

    Liu et al., "Towards Robust Neural Networks via Random Self-ensemble", ECCV 2018,
    https://arxiv.org/abs/1712.00673. Defaults: std 0.2 before the first convolution (pixel units),
    0.1 before the others (activation units), prediction = sum of softmaxes over 10 draws.

    Trainer evaluation calls ``eval_logits``: the log of the mean softmax over the draws, so
    eval_accuracy is the ensemble's and eval_loss its negative log-likelihood. The saved weights
    loaded without the hooks are the noiseless network (the card says so).
    """

    name = "rse"
    flags = ("rse_init_std", "rse_inner_std", "rse_draws")

    def __init__(self, config):
        super().__init__(config)
        self.init_std, self.inner_std, self.draws = config.rse_init_std, config.rse_inner_std, config.rse_draws
        self.noise: RSENoise | None = None

    def wrap_model(self, model):
        pretrained_cfg = getattr(getattr(model, "config", None), "pretrained_cfg", None) or {}
        self.noise = add_rse_noise(model, self.init_std, self.inner_std, pretrained_cfg.get("std"))
        return model

    def eval_logits(self, model, pixel_values):
        return ensemble_log_probs(model, pixel_values, self.draws)

    def describe(self) -> dict:
        settings = {"init_std": self.init_std, "inner_std": self.inner_std, "draws": self.draws,
                    "init_std_units": "pixels in [0, 1]", "inner_std_units": "activations"}
        if self.noise is not None:
            settings["noise_layers"] = self.noise.num_layers
        settings["note"] = (f"eval_accuracy is the {self.draws}-draw ensemble with noise; the saved weights loaded "
                            "alone give the noiseless network (sep_hf.defenses.add_rse_noise restores the noise)")
        return settings


# ----------------------------------------------------------------------------------------------
# Image squeezing (ISS): JPEG and grayscale


def jpeg_recompress(images: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG encode/decode every uint8 image (N, C, H, W) with PIL at ``quality`` (4:2:0 chroma).

    libjpeg codes one image per call, so this loops over images; it runs once per training image
    before training, never per step.
    """
    from PIL import Image

    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {channels}.")
    out = torch.empty_like(images)
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK].permute(0, 2, 3, 1).contiguous().numpy()
        decoded = []
        for array in chunk:
            buffer = io.BytesIO()
            Image.fromarray(array[..., 0] if channels == 1 else array).save(buffer, format="JPEG", quality=quality,
                                                                          subsampling=2)
            decoded.append(torch.from_numpy(_decode(buffer.getvalue(), channels)))
        stacked = torch.stack(decoded)
        out[start : start + _CHUNK] = stacked.unsqueeze(1) if channels == 1 else stacked.permute(0, 3, 1, 2)
    return out


def _decode(data: bytes, channels: int):
    import numpy as np
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB"))


class JPEGRecompression(Defense):
    """Train on JPEG-recompressed images: compression squeezes out L-inf perturbations.

    Liu, Zhao and Larson, "Image Shortcut Squeezing: Countering Perturbative Availability Poisons
    with Compression" (ISS), ICML 2023, https://arxiv.org/abs/2301.13838. Default quality 10 (ISS's
    setting, which lifts SEP from 3.85% to 84.37% on CIFAR-10). Training images only.
    """

    name = "jpeg"
    flags = ("jpeg_quality",)

    def __init__(self, config):
        super().__init__(config)
        self.quality = config.jpeg_quality

    def prepare_training_images(self, images):
        return jpeg_recompress(images, self.quality)

    def describe(self) -> dict:
        import PIL

        return {"quality": self.quality, "chroma_subsampling": "4:2:0", "encoder": f"PIL {PIL.__version__}",
                "applied_to": "training images, once before training"}


LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> uint8 gray luma repeated on 3 channels (the model's input shape is kept)."""
    if images.shape[1] != 3:
        raise ValueError(f"Grayscale expects RGB images (3 channels), got {images.shape[1]}.")
    weights = torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    out = torch.empty_like(images)
    for start in range(0, len(images), _CHUNK):
        gray = (images[start : start + _CHUNK].float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255)
        out[start : start + _CHUNK] = gray.to(torch.uint8).expand(-1, 3, -1, -1)
    return out


class Grayscale(Defense):
    """Train on grayscale images (3 channels kept): squeezes colour-coded perturbations.

    Grayscale is ISS's squeeze for low-frequency / colour perturbations (Liu et al., ICML 2023,
    https://arxiv.org/abs/2301.13838). Luma weights ITU-R 601-2. Training images only.
    """

    name = "grayscale"

    def prepare_training_images(self, images):
        return to_grayscale(images)

    def describe(self) -> dict:
        return {"luma_weights": list(LUMA_WEIGHTS), "channels": 3, "applied_to": "training images, once before training"}


for _cls in (Defense, AdversarialTraining, RandomSelfEnsemble, JPEGRecompression, Grayscale):
    register_defense(_cls.name, _cls)
