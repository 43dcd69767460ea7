"""EM and REM: sample-wise (robust) error-minimizing noise.

* EM: Huang et al., "Unlearnable Examples: Making Personal Data Unexploitable", ICLR 2021,
  https://openreview.net/forum?id=iAmZUo0DxC0 (the sample-wise variant).
* REM: Fu et al., "Robust Unlearnable Examples: Protecting Data Privacy Against Adversarial
  Learning", ICLR 2022, https://openreview.net/forum?id=baUQQPwQiAg.

Both fit one perturbation delta_i per training image (L-inf ball of radius eps = rho_u) together
with a source model, in a min-min game: the noise makes the training loss small, so a model
trained on x + delta finds nothing left to learn from x.

* ``em``: repeat { train the source model for ``train_steps`` iterations on x + delta (no
  augmentation); update every delta_i by ``steps`` PGD steps that *minimize* its loss; measure the
  accuracy on x + delta } until it reaches ``stop_accuracy`` (99%) or ``iterations`` are done.
* ``rem``: the source model is adversarially trained. Each iteration takes a minibatch, moves its
  delta by ``steps`` PGD steps minimizing E_t[ max_{|a| <= rho_a} loss(f(t(x + delta) + a)) ]
  (t: random crop and flip, ``eot`` draws; the inner max: ``attack_steps`` PGD steps of radius
  rho_a, Danskin's gradient), then trains the model on t(x + delta) + a. After ``iterations``
  (the REM paper's schedule: 5,000 of batch 128, lr 0.1 x0.1 every 2,000) one more pass refines
  every delta_i with the final model. REM runs its whole schedule (an adversarially trained model
  does not reach 99%). Unlike the paper, delta_i persists between minibatches (as EM's
  sample-wise noise does) instead of restarting from scratch.

PGD runs on the model in eval mode (BatchNorm's running statistics), training steps in train mode.

Step sizes default to 2 eps / steps: EM's 0.8/255 for 20 steps and REM's rho/5 for 10 steps.
All randomness comes from generators seeded by (seed, iteration, ...), and the whole fitting state
(delta, model, optimizer, iteration, phase) is saved atomically under ``state_dir`` every
``save_every`` seconds, so a killed fit resumes to exactly what an uninterrupted one gives.
The result is rounded to uint8 levels within eps for every pixel (``Budget.clamp``).

Example::

    fit = fit_error_minimizing_noise(images_uint8, labels, EMConfig(method="rem"), state_dir="cache/rem")
    protected = images_uint8.short() + fit.delta  # int8 levels, |delta| <= 8
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from sep_hf.attacks import input_gradient, pgd, uniform_start
from sep_hf.budget import Budget
from sep_hf.data.images import quantize, uint8_to_float
from sep_hf.models import build_model
from sep_hf.protect import register_protection
from sep_hf.protect.base import ProtectionTransform, config_hash
from sep_hf.protect.ensemble import tensor_hash
from sep_hf.seeding import seeded_generator
from sep_hf.source.augment import augment_crop_flip, channel_stats
from sep_hf.utils.io import atomic_write
from sep_hf.utils.logging import get_logger

__all__ = ["EMConfig", "EMArguments", "EMTransform", "NoiseFit", "fit_error_minimizing_noise", "robust_loss"]

logger = get_logger(__name__)

METHODS = ("em", "rem")
PAPERS = {
    "em": {"title": "Unlearnable Examples: Making Personal Data Unexploitable",
           "url": "https://openreview.net/forum?id=iAmZUo0DxC0", "authors": "Huang et al., ICLR 2021"},
    "rem": {"title": "Robust Unlearnable Examples: Protecting Data Privacy Against Adversarial Learning",
            "url": "https://openreview.net/forum?id=baUQQPwQiAg", "authors": "Fu et al., ICLR 2022"},
}
STATE_FILE, NOISE_FILE = "state.pt", "noise.pt"
# Purposes of the seeded generators (so no two draws share a stream)
_INIT, _ORDER, _TRAIN, _PASS = range(4)


@dataclass
class EMConfig:
    """Hyperparameters of EM / REM fitting. Pixels in [0, 1]; ``None`` fields get the method's default."""

    method: str = field(default="em", metadata={"help": "em | rem"})
    eps: float = field(default=8 / 255, metadata={"help": "L-inf budget rho_u of the noise."})
    steps: int | None = field(default=None, metadata={"help": "PGD steps per noise update (em 20, rem 10)."})
    step_size: float | None = field(default=None, metadata={"help": "Noise PGD step (default 2 eps / steps)."})
    model: str = field(default="smallnet_cifar", metadata={"help": "Source model (timm name)."})
    iterations: int = field(default=5000, metadata={"help": "Source-model iterations (EM: at most)."})
    batch_size: int = field(default=128, metadata={"help": "Source-model batch size."})
    learning_rate: float = field(default=0.1, metadata={"help": "SGD learning rate."})
    lr_decay_every: int = field(default=2000, metadata={"help": "Multiply the lr by 0.1 every this many iterations."})
    momentum: float = 0.9
    weight_decay: float = 5e-4
    train_steps: int = field(default=10, metadata={"help": "EM: model iterations between two noise passes."})
    stop_accuracy: float = field(default=0.99, metadata={"help": "EM: stop once the accuracy on x + delta reaches it."})
    attack_eps: float = field(default=4 / 255, metadata={"help": "REM: radius rho_a of the inner attack."})
    attack_steps: int = field(default=10, metadata={"help": "REM: inner attack PGD steps."})
    attack_step_size: float | None = field(default=None, metadata={"help": "REM: attack step (default 2 rho_a / steps)."})
    eot: int = field(default=5, metadata={"help": "REM: crop/flip draws averaged per noise step."})
    crop_padding: int = field(default=4, metadata={"help": "REM: random-crop padding of the transformations t."})
    chunk_size: int = field(default=500, metadata={"help": "Examples per batch of a noise pass (REM's draws depend on it)."})
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'.")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps is in [0, 1] pixel units (8/255 = {8 / 255:.4f}); got {self.eps}: fix --eps.")
        if self.steps is None:
            self.steps = 20 if self.method == "em" else 10
        if self.step_size is None:
            self.step_size = 2 * self.eps / self.steps
        if self.attack_step_size is None:
            self.attack_step_size = 2 * self.attack_eps / max(1, self.attack_steps)
        positive = ("steps", "iterations", "batch_size", "lr_decay_every", "train_steps", "eot", "chunk_size")
        for name in positive:
            if getattr(self, name) <= 0:
                flag = f"--rem_{name}" if name == "eot" or (name == "iterations" and self.robust) else f"--em_{name}"
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}: fix {flag}.")
        if self.step_size <= 0 or self.learning_rate <= 0:
            raise ValueError(f"step_size and learning_rate must be positive (got {self.step_size}, {self.learning_rate}).")
        if not 0 <= self.attack_eps <= 1 or self.attack_steps < 0:
            raise ValueError(f"attack_eps is in [0, 1] pixel units (4/255 = {4 / 255:.4f}) and attack_steps >= 0; "
                             f"got {self.attack_eps}, {self.attack_steps}: fix --rem_attack_eps / --rem_attack_steps.")
        if not 0 < self.stop_accuracy <= 1:
            raise ValueError(f"stop_accuracy is a fraction in (0, 1], got {self.stop_accuracy}: fix --em_stop_accuracy.")

    @property
    def robust(self) -> bool:
        return self.method == "rem"


@dataclass
class EMArguments:
    """recipes/protect.py flags of ``--method em|rem`` (budgets in 1/255 units; None: preset or default)."""

    PRESETS: ClassVar[dict] = {
        # The REM paper: 5,000 iterations of batch 128, lr 0.1 x0.1 every 2,000 (EM stops earlier, at 99%
        # accuracy on x + delta); REM's inner attack 10 steps, 5 EOT draws.
        "paper": dict(em_model="resnet18_cifar", em_iterations=5000, rem_iterations=5000, em_batch_size=128,
                      em_learning_rate=0.1, em_lr_decay_every=2000, em_train_steps=10, rem_attack_steps=10, rem_eot=5),
        # The small net: 5 noise steps, EM trains 40 iterations between noise passes (at most 800), REM 150
        # iterations (no lr decay) with a 2-step inner attack and 2 EOT draws.
        "cpu": dict(em_model="smallnet_cifar", em_iterations=800, rem_iterations=150, em_batch_size=128,
                    em_learning_rate=0.1, em_lr_decay_every=320, em_train_steps=40, em_steps=5, rem_attack_steps=2,
                    rem_eot=2),
    }

    em_model: str | None = field(default=None, metadata={"help": "Source model (preset: paper resnet18_cifar, cpu smallnet_cifar)."})
    em_iterations: int | None = field(default=None, metadata={"help": "em: at most this many source iterations (preset: paper 5000, cpu 800)."})
    rem_iterations: int | None = field(default=None, metadata={"help": "rem: source iterations (preset: paper 5000, cpu 150)."})
    em_batch_size: int | None = field(default=None, metadata={"help": "Source batch size (preset: 128)."})
    em_learning_rate: float | None = field(default=None, metadata={"help": "Source SGD lr (preset: 0.1)."})
    em_lr_decay_every: int | None = field(default=None, metadata={"help": "Source lr x0.1 every N iterations (preset: paper 2000)."})
    em_train_steps: int | None = field(default=None, metadata={"help": "em: model iterations between noise passes (default 10)."})
    em_stop_accuracy: float | None = field(default=None, metadata={"help": "em: stop when the accuracy on x + delta reaches it (default 0.99)."})
    em_steps: int | None = field(default=None, metadata={"help": "Noise PGD steps per update (default: em 20, rem 10); --eps is the budget."})
    em_step_size: float | None = field(default=None, metadata={"help": "Noise PGD step in 1/255 units (default 2 eps / steps)."})
    em_chunk_size: int | None = field(default=None, metadata={"help": "Examples per batch of a noise pass (default 500)."})
    rem_attack_eps: float | None = field(default=None, metadata={"help": "rem: inner attack radius rho_a in 1/255 units (default 4)."})
    rem_attack_steps: int | None = field(default=None, metadata={"help": "rem: inner attack PGD steps (preset: paper 10)."})
    rem_eot: int | None = field(default=None, metadata={"help": "rem: crop/flip draws per noise step (preset: paper 5)."})

    def config(self, method: str, eps: float, seed: int = 0) -> EMConfig:
        """The EMConfig of ``method`` with budget ``eps`` (pixels in [0, 1])."""
        scaled = {"em_step_size": "step_size", "rem_attack_eps": "attack_eps"}  # 1/255 units on the command line
        other_iterations = "rem_iterations" if method == "em" else "em_iterations"
        values = {}
        for item in (flag.name for flag in fields(self)):  # not __dataclass_fields__: it holds the PRESETS ClassVar
            value = getattr(self, item)
            if value is None or item == other_iterations:
                continue
            name = scaled.get(item) or item.split("_", 1)[1]
            values[name] = value / 255 if item in scaled else value
        return EMConfig(method=method, eps=eps, seed=seed, **values)


@dataclass
class NoiseFit:
    """The fitted noise: ``delta`` int8 levels (N, C, H, W) such that clean uint8 + delta is the protected image."""

    delta: torch.Tensor
    model: torch.nn.Module
    iterations: int
    train_accuracy: float | None  # source model on x + delta (last measurement)
    history: list[dict]
    done: bool
    seconds: float


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x.contiguous(memory_format=torch.channels_last))


def _loss_gradient(model, y: torch.Tensor):
    """The direction function of PGD on the summed cross-entropy of ``model`` at labels ``y``."""
    return lambda x, step=0: input_gradient(lambda z: F.cross_entropy(_logits(model, z), y, reduction="sum"), x)


def _attack(model, z: torch.Tensor, y: torch.Tensor, config: EMConfig, generator: torch.Generator) -> torch.Tensor:
    """REM's inner max: an L-inf PGD perturbation a (|a| <= rho_a, z + a in [0, 1]) from a random start."""
    if config.attack_eps == 0 or config.attack_steps == 0:
        return torch.zeros_like(z)
    start = uniform_start(z, config.attack_eps, generator)
    return pgd(_loss_gradient(model, y), z, config.attack_eps, config.attack_step_size, config.attack_steps,
               start=start, ascend=True) - z


def robust_loss(model, x: torch.Tensor, y: torch.Tensor, config: EMConfig, generator: torch.Generator,
                delta: torch.Tensor | None = None, with_grad: bool = False):
    """REM's objective: mean over ``eot`` crop/flip draws t of loss(f(t(x + delta) + a*)), a* the inner attack.

    Returns the summed loss per draw averaged over draws, and (``with_grad``) its gradient in delta.
    """
    model.eval()
    delta = torch.zeros_like(x) if delta is None else delta
    total, grad = 0.0, torch.zeros_like(x)
    for _ in range(config.eot):
        d = delta.detach().requires_grad_(with_grad)
        z = augment_crop_flip(x + d, config.crop_padding, True, generator)
        a = _attack(model, z.detach(), y, config, generator)
        with torch.set_grad_enabled(with_grad):
            loss = F.cross_entropy(_logits(model, z + a), y, reduction="sum")
        if with_grad:
            grad += torch.autograd.grad(loss, d)[0]
        total += loss.item()
    return total / config.eot, grad


def _source_model(images: torch.Tensor, config: EMConfig, num_classes: int, device) -> torch.nn.Module:
    mean, std = channel_stats(images)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(config.seed)
        model = build_model(config.model, num_classes, img_size=tuple(images.shape[2:]), mean=mean, std=std)
    return model.to(device, memory_format=torch.channels_last)


class _Fitter:
    """The min-min game's state and its steps; ``state_dict`` is everything a resume needs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, config: EMConfig, num_classes: int, device):
        self.config, self.device = config, torch.device(device)
        self.x = uint8_to_float(images).to(self.device)
        self.y = labels.to(self.device)
        self.model = _source_model(images, config, num_classes, self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.delta = uniform_start(self.x, config.eps, seeded_generator(config.seed, _INIT)) - self.x
        self.batch_size = min(config.batch_size, len(self.x))
        self.iteration, self.phase, self.chunk, self.done = 0, "train", 0, False
        self.accuracy, self.history, self.seconds = None, [], 0.0
        self._order = (None, None)

    # -- state -------------------------------------------------------------------------------------
    _FIELDS = ("iteration", "phase", "chunk", "done", "accuracy", "history", "seconds")

    def state_dict(self) -> dict:
        return {"delta": self.delta.cpu(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **{name: getattr(self, name) for name in self._FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.delta = state["delta"].to(self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name in self._FIELDS:
            setattr(self, name, state[name])

    # -- steps ---------------------------------------------------------------------------------------
    def _batch(self) -> torch.Tensor:
        per_epoch = len(self.x) // self.batch_size
        epoch, position = divmod(self.iteration, per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self.x), generator=seeded_generator(self.config.seed, _ORDER, epoch)))
        return self._order[1][position * self.batch_size : (position + 1) * self.batch_size].to(self.device)

    def _minimize(self, x, y, delta, generator) -> torch.Tensor:
        """``steps`` signed-gradient steps of delta down the (robust, for REM) training loss."""
        config = self.config
        self.model.eval()
        if config.robust:
            def direction(noisy, step):
                return robust_loss(self.model, x, y, config, generator, noisy - x, with_grad=True)[1]
        else:
            direction = _loss_gradient(self.model, y)
        return pgd(direction, x, config.eps, config.step_size, config.steps, start=x + delta) - x

    def train_iteration(self) -> float:
        config, index = self.config, self._batch()
        x, y = self.x[index], self.y[index]
        generator = seeded_generator(config.seed, _TRAIN, self.iteration)
        if config.robust:  # REM: the batch's noise first, then adversarial training on it
            self.delta[index] = self._minimize(x, y, self.delta[index], generator)
            z = augment_crop_flip(x + self.delta[index], config.crop_padding, True, generator)
            self.model.eval()
            inputs = z + _attack(self.model, z, y, config, generator)
        else:
            inputs = x + self.delta[index]
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate * 0.1 ** (self.iteration // config.lr_decay_every)
        self.model.train()
        loss = F.cross_entropy(_logits(self.model, inputs), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return loss.item()

    @property
    def num_chunks(self) -> int:
        return -(-len(self.x) // self.config.chunk_size)

    def noise_chunk(self) -> None:
        config = self.config
        index = torch.arange(self.chunk * config.chunk_size, min((self.chunk + 1) * config.chunk_size, len(self.x)),
                             device=self.device)
        generator = seeded_generator(config.seed, _PASS, self.iteration, self.chunk)
        self.delta[index] = self._minimize(self.x[index], self.y[index], self.delta[index], generator)
        self.chunk += 1

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        correct = 0
        for start in range(0, len(self.x), self.config.chunk_size):
            stop = start + self.config.chunk_size
            logits = _logits(self.model, self.x[start:stop] + self.delta[start:stop])
            correct += (logits.argmax(1) == self.y[start:stop]).sum().item()
        return correct / len(self.x)

    def step(self) -> None:
        """One unit of work: a training iteration, or one chunk of a noise pass."""
        config = self.config
        if self.phase == "train":
            loss = self.train_iteration()
            end_of_round = self.iteration % config.train_steps == 0 and not config.robust
            if end_of_round or self.iteration >= config.iterations:
                self.phase, self.chunk = "noise", 0
            if config.robust and self.iteration % 50 == 0:
                logger.info("%s iteration %d/%d: source loss %.4f", config.method, self.iteration, config.iterations, loss)
            return
        self.noise_chunk()
        if config.robust:
            logger.info("rem final pass: %d/%d chunks", self.chunk, self.num_chunks)
        if self.chunk < self.num_chunks:
            return
        self.phase, self.chunk = "train", 0
        if config.robust:  # REM: the final pass is done
            self.done = True
            return
        self.accuracy = self.evaluate()
        self.history.append({"iteration": self.iteration, "train_accuracy": self.accuracy})
        logger.info("em iteration %d/%d: source accuracy on x + delta %.4f (stop at %.2f)", self.iteration,
                    config.iterations, self.accuracy, config.stop_accuracy)
        self.done = self.accuracy >= config.stop_accuracy or self.iteration >= config.iterations

    def result(self) -> NoiseFit:
        clean = self.x.cpu()
        levels = quantize(Budget.from_pixels(self.config.eps).clamp(clean + self.delta.cpu(), clean)).short() - quantize(clean).short()
        return NoiseFit(levels.to(torch.int8), self.model, self.iteration, self.accuracy, list(self.history),
                        self.done, self.seconds)


def _save(payload: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))  # a kill leaves the previous state intact


def _wait_for_fit(state_dir: Path, stale_after: float) -> None:
    """Non-main processes wait for the main process's fit, and give up if it stops making progress.

    The main process saves its state at least every ``save_every`` seconds; a state file that has
    not changed for ``stale_after`` seconds means the main process died (a barrier would hang).
    """
    last_change = time.time()
    while not (state_dir / NOISE_FILE).exists():
        state = state_dir / STATE_FILE
        if state.exists():
            last_change = max(last_change, state.stat().st_mtime)
        if time.time() - last_change > stale_after:
            raise TimeoutError(f"The main process's noise fit in {state_dir} made no progress for {stale_after:.0f} s: "
                               "it probably died; rerun the command (the fit resumes from its last state).")
        time.sleep(2.0)


def fit_key(images: torch.Tensor, labels: torch.Tensor, config: EMConfig, num_classes: int) -> str:
    """Identity of a fit: configuration and data (cache folders and states are keyed on it)."""
    return config_hash("em-fit", asdict(config), tensor_hash(images, labels), num_classes)


def fit_error_minimizing_noise(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: EMConfig,
    num_classes: int | None = None,
    state_dir: str | Path | None = None,
    max_iterations: int | None = None,
    device="cpu",
    save_every: float = 60.0,
) -> NoiseFit:
    """Fit EM / REM noise for ``images`` (uint8, N x C x H x W) and ``labels``; see the module docstring.

    With ``state_dir`` the fit resumes from its saved state and saves it every ``save_every``
    seconds; the finished noise is kept there (``noise.pt``) and returned by later calls.
    ``max_iterations`` pauses the fit (state saved, ``done=False``) before source iteration
    ``max_iterations``; calling again continues it.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images must be uint8 (N, C, H, W) with N = len(labels); got {images.dtype} "
                         f"{tuple(images.shape)}, {len(labels)}.")
    num_classes = num_classes or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}).")
    key = fit_key(images, labels, config, num_classes)
    state_path = noise_path = None
    if state_dir is not None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        state_path, noise_path = state_dir / STATE_FILE, state_dir / NOISE_FILE
        if noise_path.exists():
            saved = torch.load(noise_path, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                model = _source_model(images, config, num_classes, device)
                model.load_state_dict(saved["model"])
                return NoiseFit(saved["delta"], model, saved["iterations"], saved["accuracy"], saved["history"],
                                True, saved["seconds"])
    fitter = _Fitter(images, labels, config, num_classes, device)
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["key"] == key:
            fitter.load_state_dict(state)
            logger.info("Resuming the %s fit at iteration %d (%s)", config.method, fitter.iteration, fitter.phase)
        else:
            logger.warning("Ignoring %s: it belongs to another configuration or dataset", state_path)

    def save():
        if state_path is not None:
            _save({"key": key, **fitter.state_dict()}, state_path)

    started = last_save = time.perf_counter()
    elapsed = fitter.seconds
    while not fitter.done:
        if max_iterations is not None and fitter.phase == "train" and fitter.iteration >= max_iterations:
            fitter.seconds = elapsed + time.perf_counter() - started
            save()
            return fitter.result()
        fitter.step()
        if time.perf_counter() - last_save >= save_every:
            fitter.seconds = elapsed + time.perf_counter() - started
            save()
            last_save = time.perf_counter()
    fitter.seconds = elapsed + time.perf_counter() - started
    fit = fitter.result()
    if noise_path is not None:
        _save({"key": key, "delta": fit.delta, "model": fit.model.state_dict(), "iterations": fit.iterations,
               "accuracy": fit.train_accuracy, "history": fit.history, "seconds": fit.seconds}, noise_path)
        state_path.unlink(missing_ok=True)  # the noise is final; the (large) game state is not needed any more
    return fit


_PIXEL_FIELDS = ("eps", "step_size", "attack_eps", "attack_step_size")  # reported in 1/255 units


@register_protection(*METHODS)
class EMTransform(ProtectionTransform):
    """``Dataset.map`` adapter adding fitted EM / REM noise to the training split, by global index."""

    name = "em"
    arguments = EMArguments
    protects_all_splits = False  # the noise exists for the fitted (training) split only
    # How long non-main processes wait for a fit that shows no progress (saves come every 60 s).
    stale_fit_seconds: ClassVar[float] = 900.0

    def __init__(self, clean: torch.Tensor, fit: NoiseFit, config: EMConfig, image_column: str = "img",
                 label_column: str = "label", return_stats: bool = False):
        super().__init__(image_column, label_column, return_stats)
        if clean.shape != fit.delta.shape:
            raise ValueError(f"The noise {tuple(fit.delta.shape)} does not match the images {tuple(clean.shape)}.")
        self.clean, self.fit, self.config = clean, fit, config
        self.name = config.method
        self.paper = PAPERS[config.method]
        self._delta_hash = tensor_hash(fit.delta)

    def protect(self, images, labels, indices):
        if len(indices) and indices.max() >= len(self.clean):
            raise ValueError(f"{self.config.method} noise was fitted for {len(self.clean)} training images; "
                             f"index {int(indices.max())} is beyond them.")
        clean = quantize(images)
        if not torch.equal(clean, self.clean[indices]):
            raise ValueError(f"{self.config.method} noise was fitted on the training split and cannot protect other "
                             "images: drop them from --protect_splits.")
        return (clean.short() + self.fit.delta[indices]).clamp_(0, 255).float().div_(255.0)

    def fingerprint(self) -> str:
        return config_hash(asdict(self.config), self._delta_hash)

    def describe(self) -> dict:
        config = self.config
        return {
            **super().describe(),
            "config": {**asdict(config), **{name: round(getattr(config, name) * 255, 6) for name in _PIXEL_FIELDS},
                       "units": "eps, step sizes: 1/255"},
            "steps": config.steps, "step_size": round(config.step_size * 255, 6),
            "fit": {"iterations": self.fit.iterations, "train_accuracy": self.fit.train_accuracy,
                    "seconds": self.fit.seconds, "history": self.fit.history, "noise_sha256": self._delta_hash},
        }

    @classmethod
    def from_arguments(cls, context, name: str) -> EMTransform:
        train_split = context.data_args.train_split
        if context.args.protect_splits and set(context.args.protect_splits) != {train_split}:
            raise ValueError(f"{name} noise is fitted on the training split only; "
                             f"--protect_splits can only name '{train_split}'.")
        config = context.arguments(EMArguments).config(name, context.eps, context.seed)
        if not context.native_size:
            raise ValueError(f"{name} fits one noise tensor per image at one size, but the images of '{context.data_args.dataset}' "
                             "are not all at the models' input size: pass --resize H W to publish them at one size.")
        images, labels = context.train_tensors
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{name} fits its noise on the whole training split in memory: raise --keep_in_memory_mb "
                             f"above its decoded size ({len(images)} images at {images.shape[2]}x{images.shape[3]}).")
        num_classes = context.columns.num_classes
        state_dir = context.output_dir / "cache" / f"{config.method}-{fit_key(images, labels, config, num_classes)[:16]}"
        if not context.accelerator.is_main_process:  # the main process fits (minutes to hours)
            _wait_for_fit(state_dir, cls.stale_fit_seconds)
        fit = fit_error_minimizing_noise(images, labels, config, num_classes, state_dir=state_dir,
                                         device=context.accelerator.device)
        context.accelerator.wait_for_everyone()
        return cls(images, fit, config, image_column=context.columns.image, label_column=context.columns.label,
                   return_stats=True)
