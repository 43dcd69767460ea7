"""SEP, SEP-FA and SEP-FA-VR: Self-Ensemble Protection (Chen et al., ICLR 2023).

Paper: "Self-Ensemble Protection: Training Checkpoints Are Good Data Protectors",
https://openreview.net/forum?id=9MO7bjoAfIA. Distance measure: L-inf. Pixels in [0, 1].

Given K checkpoints f_1..f_K of one training run and an image x of class y (C classes), push x
towards the target class g(y) = (y + C/2) mod C with T signed-gradient steps of size alpha,
projected onto the eps-ball around x and [0, 1]:

* ``sep``: loss_k = CE(f_k(x'), g(y)), step along -sign(mean_k grad loss_k).
* ``sep-fa``: loss_k = MSE(phi_k(x'), mu_k[g(y)]), phi_k the penultimate features of checkpoint k
  and mu_k[c] their mean over the clean training images of class c.
* ``sep-fa-vr``: per outer step, the ensemble gradient G and each g_k at x'; then M inner steps
  each pick a checkpoint j (per example, seeded by the example's global index) and move an inner
  copy along the accumulated variance-reduced direction grad loss_j(x_inner) - (g_j - G), using
  checkpoint j's own class means; the outer step follows the accumulated direction.

Output pixels are rounded to uint8 levels and clamped so |x' - x| <= eps holds for every pixel.

Example::

    ensemble = CheckpointEnsemble.from_pretrained("org/cifar10-sep-source", num_models=6)
    protected = craft_sep(images, labels, ensemble, SEPConfig(method="sep-fa-vr", eps=8 / 255, steps=30))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from sep_hf import squeezes
from sep_hf.attacks import pgd, sign_step
from sep_hf.budget import Budget
from sep_hf.data.load import public_name
from sep_hf.gratings import class_gratings
from sep_hf.models import RaggedResize, resize_to_model
from sep_hf.pixel_shortcuts import class_pixels
from sep_hf.protect import register_protection
from sep_hf.protect.base import SEP_PAPER, ProtectionTransform, config_hash
from sep_hf.protect.ensemble import CheckpointEnsemble, near_chance, near_chance_advice, tensor_hash
from sep_hf.protect.eot import apply_views, lowpass_direction, parse_views
from sep_hf.seeding import draw_keys, splitmix64
from sep_hf.utils.logging import get_logger

__all__ = ["SEPConfig", "SEPArguments", "SEPTransform", "craft_sep", "vr_picks", "target_classes", "present_targets"]

logger = get_logger(__name__)

METHODS = ("sep", "sep-fa", "sep-fa-vr")


@dataclass
class SEPConfig:
    """Hyperparameters of SEP crafting (paper defaults: eps 8/255, 30 steps of 1/255)."""

    method: str = field(default="sep-fa-vr", metadata={"help": "sep | sep-fa | sep-fa-vr"})
    eps: float = field(default=8 / 255, metadata={"help": "L-inf budget, pixels in [0, 1] (8/255 = 0.0314)."})
    steps: int = field(default=30, metadata={"help": "Outer signed-gradient steps T."})
    step_size: float = field(default=1 / 255, metadata={"help": "Step size alpha, pixels in [0, 1]."})
    vr_steps: int | None = field(default=None, metadata={"help": "Inner VR steps M (default: K, the ensemble size)."})
    seed: int = field(default=0, metadata={"help": "Seed of VR's checkpoint picks (with each example's index)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast where the device runs it fast (CUDA, AMX CPUs)."})
    # Robustness (sep-robust): craft through random differentiable squeezes, in a space they keep.
    craft_transforms: tuple[str, ...] = field(default=(), metadata={"help": "Views of sep_hf.protect.eot.VIEWS the loss is averaged over."})
    eot_samples: int = field(default=1, metadata={"help": "View draws per checkpoint gradient."})
    perturbation_block: int = field(default=1, metadata={"help": "Perturbation constant over BxB pixel blocks."})
    shared_channels: bool = field(default=False, metadata={"help": "One perturbation for all colour channels (luma only)."})
    classwise_share: float = field(default=0.0, metadata={"help": "Share of eps taken by a class-wise +-pattern (model-free)."})
    classwise_block: int = field(default=4, metadata={"help": "The class-wise pattern is constant over BxB blocks."})
    jpeg_grid_quality: int = field(default=0, metadata={"help": "After crafting, pick each 8x8 block's luma DC level at this JPEG quality (0: off)."})
    grating_amplitude: int = field(default=0, metadata={"help": "Levels (1/255) of a class-wise luma grating added after crafting, beyond eps (0: off)."})
    pixel_shortcuts: bool = field(default=False, metadata={"help": "After crafting, set one seeded saturated pixel per class (sep_hf.pixel_shortcuts), beyond eps."})

    def __post_init__(self):
        views = self.craft_transforms
        self.craft_transforms = parse_views(views if isinstance(views, str) else ",".join(views))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'.")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps is in [0, 1] pixel units (8/255 = {8 / 255:.4f}); got {self.eps}.")
        if self.steps <= 0 or self.step_size <= 0:
            raise ValueError(f"steps and step_size must be positive (got {self.steps}, {self.step_size}).")
        if self.vr_steps is not None and self.vr_steps <= 0:
            raise ValueError(f"vr_steps must be positive, got {self.vr_steps}.")
        if not 0 <= self.classwise_share <= 1 or self.classwise_block < 1:
            raise ValueError(f"classwise_share must be in [0, 1] and classwise_block >= 1, got {self.classwise_share}, "
                             f"{self.classwise_block}.")
        if not 0 <= self.jpeg_grid_quality <= 95:
            raise ValueError(f"jpeg_grid_quality is a JPEG quality in 1..95 (0: off), got {self.jpeg_grid_quality}.")
        if not 0 <= self.grating_amplitude <= 64:
            raise ValueError(f"grating_amplitude is in whole 1/255 levels, 0..64 (0: off), got {self.grating_amplitude}.")
        if self.eot_samples < 1 or self.perturbation_block < 1:
            raise ValueError(f"eot_samples and perturbation_block must be >= 1, got {self.eot_samples}, {self.perturbation_block}.")

    @property
    def uses_features(self) -> bool:
        return self.method != "sep"

    def gradient_evaluations(self, num_models: int) -> int:
        """Per-image forward+backward passes: T K for SEP and SEP-FA, T (K + M) for SEP-FA-VR (times the EOT samples)."""
        inner = (self.vr_steps or num_models) if self.method == "sep-fa-vr" else 0
        return self.steps * (num_models + inner) * (self.eot_samples if self.craft_transforms else 1)


@dataclass
class SEPArguments:
    """recipes/protect.py flags of ``--method sep|sep-fa|sep-fa-vr`` (step sizes in 1/255 units)."""

    PRESETS: ClassVar[dict] = {
        # The paper: 30 steps of 1/255. cpu: 10 steps of 2/255 (T * alpha = 2.5 eps; with 1/255 steps
        # plain SEP left the victim at 20.3% instead of 14.3%: bench/results/sep_effectiveness_*).
        "paper": {"steps": 30, "step_size": 1.0},
        "cpu": {"steps": 10, "step_size": 2.0},
    }
    # Equal compute per step, as in the paper: SEP and SEP-FA with 30 checkpoints, SEP-FA-VR with 15
    # checkpoints + 15 inner steps (30 gradient evaluations each; the paper source keeps 30).
    PAPER_NUM_MODELS: ClassVar[dict] = {"sep": 30, "sep-fa": 30, "sep-fa-vr": 15}

    steps: int | None = field(default=None, metadata={"help": "Crafting steps T (preset: paper 30, cpu 10)."})
    step_size: float | None = field(default=None, metadata={"help": "Step size alpha in 1/255 units (preset: paper 1, cpu 2)."})
    vr_steps: int | None = field(default=None, metadata={"help": "SEP-FA-VR inner steps M (default: the ensemble size)."})
    num_models: int | None = field(default=None, metadata={"help": "Checkpoints K in the ensemble, evenly spaced (preset paper: 30 for sep and sep-fa, 15 for sep-fa-vr, equal compute; otherwise all of the source run, the run trained here keeps --num_checkpoints: paper 30, cpu 6)."})
    checkpoints: str | None = field(default=None, metadata={"help": "Source run folder or Hub model repo; none: train one first."})
    checkpoints_revision: str | None = field(default=None, metadata={"help": "Revision of --checkpoints on the Hub."})


def target_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """g(y) = (y + C/2) mod C: CIFAR-10 (y + 5) % 10, CIFAR-100 (y + 50) % 100."""
    return (labels + num_classes // 2) % num_classes


def present_targets(class_counts: torch.Tensor) -> torch.Tensor | None:
    """g(y) over the classes that have training images only: (C,) target of each class, or None when
    every class has images (then g is ``target_classes``). With present classes p_0 < ... < p_{P-1},
    class y (present or not) targets p[(rank(y) + P/2) mod P], rank(y) = #present classes below y; a class without
    images has no mean feature (SEP-FA) and is never a target. Raises ValueError with fewer than two present."""
    present = (class_counts > 0).nonzero().squeeze(1)
    if len(present) == len(class_counts):
        return None
    if len(present) < 2:
        raise ValueError(f"SEP pushes each image towards another class, but only {len(present)} of "
                         f"{len(class_counts)} classes have training images.")
    rank = torch.searchsorted(present, torch.arange(len(class_counts)))
    return present[(rank + len(present) // 2) % len(present)]


def vr_picks(indices: torch.Tensor, seed: int, outer_step: int, inner_steps: int, num_models: int) -> torch.Tensor:
    """(N, M) checkpoint picks for VR, a pure function of (seed, global index, step): no process state."""
    key = splitmix64(torch.full_like(indices, seed) * 1_000_003 + indices.long())
    key = splitmix64(key + outer_step)
    inner = torch.arange(inner_steps, device=indices.device)
    mixed = splitmix64(key.view(-1, 1) * 31 + inner.view(1, -1))
    return ((mixed >> 1) % num_models).long()  # >> 1 keeps the value non-negative


def _loss(ensemble: CheckpointEnsemble, k: int, x: torch.Tensor, target: torch.Tensor, class_means) -> torch.Tensor:
    """Sum over examples of checkpoint k's SEP loss (per-example terms are independent)."""
    model = ensemble.models[k]
    x = x.contiguous(memory_format=torch.channels_last)
    if class_means is None:
        return F.cross_entropy(model(x).float(), target, reduction="sum")
    features = model.features(x).float()
    return (features - class_means[k][target]).pow(2).mean(1).sum()


def _grad(ensemble, k, x, target, class_means, bf16: bool) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with ensemble.autocast(bf16):
        loss = _loss(ensemble, k, x, target, class_means)
    return torch.autograd.grad(loss, x)[0]


def _view_grad(ensemble, k, x, target, class_means, config: SEPConfig, keys: torch.Tensor | None) -> torch.Tensor:
    """Checkpoint k's gradient at x, averaged over ``config.eot_samples`` random views (keys: one per example)."""
    if not config.craft_transforms:
        return _grad(ensemble, k, x, target, class_means, config.bf16)
    total = torch.zeros_like(x)
    for sample in range(config.eot_samples):
        x_in = x.detach().requires_grad_(True)
        sample_keys = splitmix64(keys * 37 + sample)
        viewed = apply_views(x_in, sample_keys, config.craft_transforms)  # fp32: JPEG's rounding needs it
        with ensemble.autocast(config.bf16):
            loss = _loss(ensemble, k, viewed, target, class_means)
        total += torch.autograd.grad(loss, x_in)[0]
    return total / config.eot_samples


def _lowpass(direction: torch.Tensor, config: SEPConfig) -> torch.Tensor:
    return lowpass_direction(direction, config.perturbation_block, config.shared_channels)


def _vr_direction(ensemble, x, center, eps: float, target, class_means, config: SEPConfig, picks: torch.Tensor,
                  keys) -> torch.Tensor:
    """SEP-FA-VR's outer direction: M inner steps along variance-reduced gradients, accumulated.

    ``keys(k)`` gives checkpoint k's per-example view keys of this step (inner step m uses K + m).
    """
    K = ensemble.num_models
    per_model = torch.stack([_view_grad(ensemble, k, x, target, class_means, config, keys(k)) for k in range(K)])
    mean_grad = per_model.mean(0)
    inner, accumulated = x.clone(), torch.zeros_like(x)
    rows = torch.arange(len(x), device=x.device)
    for m in range(picks.shape[1]):
        direction = torch.empty_like(x)
        for k in picks[:, m].unique().tolist():
            chosen = (picks[:, m] == k).nonzero().squeeze(1)
            inner_keys = keys(K + m)
            direction[chosen] = _view_grad(ensemble.rows(chosen), k, inner[chosen], target[chosen], class_means, config,
                                           None if inner_keys is None else inner_keys[chosen])
        accumulated += direction - (per_model[picks[:, m], rows] - mean_grad)
        inner = sign_step(inner, _lowpass(accumulated, config), center, eps, config.step_size)
    return accumulated


class _ViewedModel(torch.nn.Module):
    """A checkpoint behind a fixed input view (``RaggedResize``): ``model(view(x))``, ``features`` too."""

    def __init__(self, model, view):
        super().__init__()
        self.model, self.view = model, view

    def forward(self, x):
        return self.model(self.view(x))

    def features(self, x):
        return self.model.features(self.view(x))


class _ViewedEnsemble:
    """The ensemble as ``craft_sep`` uses it, every checkpoint seen through one input view."""

    def __init__(self, ensemble: CheckpointEnsemble, view):
        self.ensemble, self.view = ensemble, view
        self.models = [_ViewedModel(model, view) for model in ensemble.models]

    def rows(self, index) -> _ViewedEnsemble:
        """The ensemble as seen by a subset of the images (their own resizes)."""
        return _ViewedEnsemble(self.ensemble, self.view[index])

    def __getattr__(self, name):
        return getattr(self.ensemble, name)


def craft_sep(
    images: torch.Tensor,
    labels: torch.Tensor,
    ensemble: CheckpointEnsemble,
    config: SEPConfig,
    indices: torch.Tensor | None = None,
    class_means: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Protect ``images`` (N, C, H, W) in [0, 1] with SEP; returns float pixels on the 1/255 grid.

    Images of any size: each checkpoint resizes its input to its own size (``models.resize_to_model``),
    so the perturbation is crafted at the images' resolution through that resize. ``indices`` (global
    example indices, default 0..N-1) seed VR's picks. ``class_means`` (K, C, D) for the FA variants;
    by default they are computed from ``images`` and ``labels`` themselves, so pass the ones of the
    whole training set when crafting a part of it. ``targets`` (C,): the target class of each class
    (``present_targets``; default ``target_classes``). ``sizes`` (N, 2): images of different sizes in
    one zero-padded canvas, image i in its top-left (h_i, w_i) corner; the checkpoints see each one
    resized by ``models.RaggedResize`` (batched, no per-image loop) and the padding stays zero.
    Raises ValueError for labels outside the classes, or ``sizes`` without ``class_means`` for SEP-FA.
The algorithm is the module docstring's (Chen et al., ICLR 2023: SEP, SEP-FA feature alignment,
SEP-FA-VR variance reduction).
    """
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images must be (N, C, H, W) with N = len(labels); got {tuple(images.shape)}, {len(labels)}.")
    device = ensemble.device
    if sizes is not None and bool((sizes != sizes[0]).any()):
        if config.uses_features and class_means is None:
            raise ValueError("Images of different sizes in one canvas need class_means (of the training images).")
        view = RaggedResize(sizes, images.shape[-2:], ensemble.models[0].input_size, device=device)
        ensemble = _ViewedEnsemble(ensemble, view)
    original = images.to(device, torch.float32)
    labels = labels.to(device)
    if labels.numel() and (labels.min() < 0 or labels.max() >= ensemble.num_classes):
        raise ValueError(f"labels must be in [0, {ensemble.num_classes}); the ensemble has {ensemble.num_classes} classes.")
    indices = (torch.arange(len(labels)) if indices is None else indices).to(device)
    target = target_classes(labels, ensemble.num_classes) if targets is None else targets.to(device)[labels]
    if config.uses_features:
        if class_means is None:
            class_means = ensemble.class_means(images, labels.cpu())
        class_means = class_means.to(device, torch.float32)
    else:
        class_means = None
    K = ensemble.num_models

    def keys(step: int):  # the views of (example, step, checkpoint or inner step): no process state
        if not config.craft_transforms:
            return lambda k: None
        return lambda k: draw_keys(indices, config.seed, step, k)

    def direction(x: torch.Tensor, step: int) -> torch.Tensor:
        if config.method == "sep-fa-vr":
            picks = vr_picks(indices, config.seed, step, config.vr_steps or K, K)
            return _lowpass(_vr_direction(ensemble, x, center, eps, target, class_means, config, picks, keys(step)), config)
        step_keys = keys(step)
        return _lowpass(sum(_view_grad(ensemble, k, x, target, class_means, config, step_keys(k)) for k in range(K)),
                        config)

    # The class-wise share (sep-robust) moves every image of a class by one fixed pattern; SEP
    # crafts within the rest of the budget around it.
    center, eps = original, config.eps
    if config.classwise_share > 0:
        center, eps = classwise_shift(original, labels, ensemble.num_classes, config)
    protected = pgd(direction, center, eps, config.step_size, config.steps) if eps > 0 else center
    protected = Budget.from_pixels(config.eps).clamp(protected, original)
    if config.jpeg_grid_quality:
        if sizes is not None and bool((sizes != sizes[0]).any()):
            raise ValueError("jpeg_grid_quality needs images of one size per batch (JPEG's 8x8 grid starts at each corner).")
        protected = jpeg_grid_step(protected, original, config.eps, direction(protected, config.steps),
                                   config.jpeg_grid_quality)
    if config.grating_amplitude:  # model-free, beyond the budget: adversarial training at eps cannot cancel it
        gratings = class_gratings(labels.cpu(), indices.cpu(), protected.shape[-2:], ensemble.num_classes, config.seed)
        protected = (protected + config.grating_amplitude / 255 * gratings.to(protected)).mul(255).round().div(255).clamp(0, 1)
    if config.pixel_shortcuts:  # one pixel far beyond the budget: neither AT's radius nor RSE's noise moves it back
        protected = class_pixels(protected, labels.cpu(), ensemble.num_classes, config.seed, sizes)
    return protected


def luma_dc_step(quality: int) -> int:
    """libjpeg's luma DC quantization step at ``quality`` (base table entry 16, IJG quality scaling)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return int(min(max((16 * scale + 50) // 100, 1), 255))


def jpeg_grid_step(protected: torch.Tensor, original: torch.Tensor, eps: float, direction: torch.Tensor,
                   quality: int) -> torch.Tensor:
    """Choose, per full 8x8 block, the neighbouring luma DC level a JPEG encoder at ``quality`` lands on.

    JPEG quantizes DC = 8 (mean luma - 128) in steps Q (80 at quality 10), so a block-constant shift of
    the three channels (luma moves, chroma does not) within the budget crosses a rounding boundary in most
    blocks (bench/jpeg_grid.py: 78% up, 79% down at 8/255), and the decoded block then moves by Q / 8
    levels. The side is the one the crafting loss descends: minus the sign of ``direction`` (N, C, H, W,
    the loss gradient at ``protected``) summed over the block's luma; the shift is the smallest that
    crosses (at most 2 eps), so SEP's fine pattern is kept where it can be. ``protected`` and ``original``
    are float pixels (N, C, H, W) on the 1/255 grid, C = 1 or 3; the result stays within ``eps`` of
    ``original`` for every pixel. Blocks that cannot cross are left unchanged.
    """
    levels = round(eps * 255)
    height, width = (size - size % 8 for size in protected.shape[-2:])
    if not height or not width or levels < 1:
        return protected
    pixels, base = (t[..., :height, :width] * 255 for t in (protected, original))
    weights = torch.tensor(squeezes.LUMA_WEIGHTS if pixels.shape[1] == 3 else (1.0,), device=pixels.device).view(1, -1, 1, 1)

    def block_luma(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d((x * weights).sum(1, keepdim=True), 8)  # (N, 1, H/8, W/8)

    step = luma_dc_step(quality)
    level = torch.round(8 * (block_luma(pixels) - 128) / step)
    side = -block_luma(direction[..., :height, :width].float()).sign()  # descend the loss; 0: leave the block
    shift = torch.zeros_like(level)
    for magnitude in range(2 * levels, 0, -1):  # descending: the smallest shift that crosses is kept
        moved = _shift_blocks(pixels, base, side * magnitude, levels)
        crosses = torch.round(8 * (block_luma(moved) - 128) / step) == level + side
        shift = torch.where(crosses & (side != 0), side * magnitude, shift)
    out = protected.clone()
    out[..., :height, :width] = _shift_blocks(pixels, base, shift, levels) / 255
    return out


def _shift_blocks(pixels: torch.Tensor, base: torch.Tensor, shift: torch.Tensor, levels: int) -> torch.Tensor:
    """``pixels`` (levels) plus a per-block shift (N, 1, H/8, W/8) on every channel, kept within the budget."""
    per_pixel = shift.repeat_interleave(8, -2).repeat_interleave(8, -1)
    return torch.minimum(torch.maximum(pixels + per_pixel, base - levels), base + levels).clamp(0, 255)


def classwise_levels(config: SEPConfig) -> int:
    """Whole 1/255 levels of the budget the class-wise pattern takes."""
    return int(round(config.classwise_share * config.eps * 255))


def classwise_patterns(seed: int, num_classes: int, shape, block: int) -> torch.Tensor:
    """(num_classes, 1, H, W) patterns of +-1, constant over block x block pixels, one per class, from the seed."""
    height, width = shape
    generator = torch.Generator().manual_seed(int(draw_keys(torch.tensor([0x5EB]), seed)[0]) & ((1 << 62) - 1))
    grid = torch.randint(0, 2, (num_classes, 1, -(-height // block), -(-width // block)), generator=generator) * 2 - 1
    return grid.float().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :height, :width]


def classwise_shift(original: torch.Tensor, labels: torch.Tensor, num_classes: int, config: SEPConfig):
    """(images moved by their class's pattern, the budget left for SEP)."""
    levels = classwise_levels(config)
    patterns = classwise_patterns(config.seed, num_classes, original.shape[-2:], config.classwise_block).to(original.device)
    shifted = (original + levels / 255 * patterns[labels]).clamp(0, 1)  # the same pattern on every channel
    return shifted, max(0.0, config.eps - levels / 255)


@register_protection(*METHODS)
class SEPTransform(ProtectionTransform):
    """``Dataset.map`` adapter for SEP: ``dataset.map(SEPTransform(ensemble, config, image_column="img",
    label_column="label"), batched=True, with_indices=True)``. Pass ``class_means`` of the whole clean
    training set for the FA variants."""

    arguments = SEPArguments
    paper = SEP_PAPER
    extra_stat_features = {"checkpoints_predicting_label": "int32", "checkpoints_predicting_target": "int32"}
    needs_other_class = True  # pushes every image towards another class than its own
    ragged = True  # crafts images of different sizes together (sizes=...), through the models' resize

    def __init__(self, ensemble: CheckpointEnsemble, config: SEPConfig, class_means: torch.Tensor | None = None,
                 image_column: str = "img", label_column: str = "label", return_stats: bool = False,
                 targets: torch.Tensor | None = None):
        super().__init__(image_column, label_column, return_stats)
        self.targets = targets  # None: g(y) = (y + C/2) mod C over all classes
        if config.uses_features and class_means is None:
            raise ValueError(f"{config.method} needs class_means: ensemble.class_means(train_images, train_labels).")
        self.name = config.method
        self.ensemble = ensemble
        self.config = config
        self.class_means = class_means

    def protect(self, images, labels, indices, sizes=None):
        return craft_sep(images, labels, self.ensemble, self.config, indices=indices, class_means=self.class_means,
                         targets=self.targets, sizes=sizes)

    def extra_stats(self, protected, labels):
        if isinstance(protected, list):  # images of different sizes: each as the checkpoints see it
            size = self.ensemble.models[0].input_size
            protected = torch.cat([resize_to_model(image[None], size) for image in protected])
        predictions = self.ensemble.predict(protected)  # (K, N)
        target = target_classes(labels, self.ensemble.num_classes) if self.targets is None else self.targets[labels]
        return {
            "checkpoints_predicting_label": (predictions == labels).sum(0).tolist(),
            "checkpoints_predicting_target": (predictions == target).sum(0).tolist(),
        }

    @classmethod
    def config_from(cls, context, name: str) -> SEPConfig:
        args = context.arguments(SEPArguments)
        return SEPConfig(method=name, eps=context.eps, steps=args.steps, step_size=args.step_size / 255,
                         vr_steps=args.vr_steps, seed=context.seed, bf16=context.bf16)

    @classmethod
    def ensemble_size(cls, context, config: SEPConfig) -> tuple[int | None, str]:
        """(K, where it comes from): --num_models, else the paper preset's equal-compute K, else None (every checkpoint)."""
        num_models = context.arguments(SEPArguments).num_models
        if num_models is None and context.run_args.preset == "paper":
            return SEPArguments.PAPER_NUM_MODELS[config.method], f"--preset paper's --num_models for {config.method}"
        return num_models, f"--num_models {num_models}"

    @classmethod
    def check_arguments(cls, context, name: str) -> None:
        """Before any compute: the crafting settings, and an ensemble the checkpoints (or the source run
        trained first) can give; else the source would train for hours, then fail."""
        args = context.arguments(SEPArguments)
        config = cls.config_from(context, name)  # raises on bad steps, step sizes, robust settings
        context.check_ensemble_size(args.checkpoints, *cls.ensemble_size(context, config))

    @classmethod
    def from_arguments(cls, context, name: str) -> SEPTransform:
        args = context.arguments(SEPArguments)
        config = cls.config_from(context, name)
        num_models, _ = cls.ensemble_size(context, config)
        ensemble = context.ensemble(args.checkpoints, args.checkpoints_revision, num_models)
        class_means = None
        labels = torch.from_numpy(context.scans[context.data_args.train_split].labels)
        counts = torch.bincount(labels[labels >= 0], minlength=ensemble.num_classes)
        targets = present_targets(counts)
        if targets is not None:
            logger.warning("%d of %d classes have no training images: SEP targets only the %d that do",
                           int((counts == 0).sum()), ensemble.num_classes, int((counts > 0).sum()))
        if config.uses_features:
            images, labels = context.train_tensors
            with context.accelerator.main_process_first():  # the main process computes, the others read its cache
                class_means = ensemble.class_means(images, labels, cache_dir=context.output_dir / "cache" / "class_means")
        transform = cls(ensemble, config, class_means, image_column=context.columns.image,
                        label_column=context.columns.label, return_stats=True, targets=targets)
        transform.name = name
        return transform

    def describe(self) -> dict:
        config = self.config
        return {**super().describe(), "config": {**asdict(config), "num_models": self.ensemble.num_models},
                "steps": config.steps, "step_size": round(config.step_size * 255, 6),
                "gradient_evaluations_per_image": config.gradient_evaluations(self.ensemble.num_models),
                "checkpoints": {"source": self.ensemble.source, "revision": self.ensemble.revision,
                                "epochs": self.ensemble.epochs, "held_out_accuracy": self.ensemble.held_out_accuracy}}

    def card_lines(self, results: dict) -> list[str]:
        description = self.describe()
        checkpoints = description["checkpoints"]
        revision = f" at revision `{checkpoints['revision']}`" if checkpoints.get("revision") else ""
        return [f"- method: `{self.name}`, L-inf budget eps = {description['eps']}/255, {description['steps']} steps "
                f"of {description['step_size']:g}/255 ({description['gradient_evaluations_per_image']} gradient "
                "evaluations per image)",
                f"- checkpoint ensemble: {len(checkpoints['epochs'])} checkpoints (epochs {checkpoints['epochs']}) "
                f"of `{public_name(checkpoints['source'])}`{revision}",  # a local run by its folder name only
                *source_accuracy_lines(checkpoints.get("held_out_accuracy"), self.ensemble.num_classes)]

    def fingerprint(self) -> str:
        means = None if self.class_means is None else tensor_hash(self.class_means)
        targets = () if self.targets is None else (self.targets.tolist(),)  # all classes present: the historical key
        config = asdict(self.config)
        for flag in ("jpeg_grid_quality", "grating_amplitude", "pixel_shortcuts"):
            if not config[flag]:
                del config[flag]  # off: the key crafted shards had before the flag existed, so they resume
        return config_hash(config, self.ensemble.fingerprint, means, self.ensemble.device.type, *targets)


def source_accuracy_lines(held_out: dict | None, num_classes: int) -> list[str]:
    """The card's lines on the source model measured on this dataset: its held-out accuracy per kept checkpoint, and
    a warning when the last one is near chance."""
    if not held_out:
        return ["- source model's held-out accuracy: not recorded in its checkpoints"]
    lines = [f"- source model's held-out accuracy (measured on this dataset, {held_out['num_eval']} images; chance "
             f"{held_out['chance']:.4f}) at the kept checkpoints: {', '.join(f'{a:.4f}' for a in held_out['accuracy'])}"]
    if near_chance(held_out["accuracy"][-1], num_classes):
        lines.append(f"- **Warning**: {near_chance_advice(held_out)}.")
    return lines
