"""CUDA: Convolution-based Unlearnable DAtaset (Sadasivan, Soltanolkotabi and Feizi, CVPR 2023).

Paper: "CUDA: Convolution-based Unlearnable Datasets", https://arxiv.org/abs/2303.04278.
Written from the paper's description (the official code's licence forbids copying it).

Model-free. A private integer key seeds one random k x k filter per class (weights uniform in
[0, blur], one random tap set to 1.0; by default the same kernel on R, G and B). Every training
image of class y is convolved with filter y (zero padding), divided by its own maximum so it spans
[0, 1], and rounded to uint8. A model trained on such data learns the class-wise blur instead of
the image content. CUDA is not an L-inf method: ``--eps`` does not apply to it.

The key is a secret: with it, anyone can regenerate the filters and try to undo them. It is read
from ``--cuda_key_file``, ``$SEP_HF_CUDA_KEY`` or ``--cuda_key`` and never stored: the transform
keeps only the filters and a slow one-way fingerprint of the key (PBKDF2), which is all that
reaches results.json, the dataset card and cache file names.

Example::

    filters = cuda_filters(key, num_classes=10)
    protected = apply_cuda(images, labels, filters)  # float pixels on the 1/255 grid
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sep_hf.data.images import quantize
from sep_hf.protect import register_protection
from sep_hf.protect.base import ProtectionTransform, config_hash
from sep_hf.seeding import splitmix64
from sep_hf.utils.logging import get_logger

__all__ = ["CUDAConfig", "CUDAArguments", "CUDATransform", "cuda_filters", "apply_cuda", "cuda_selected",
           "key_fingerprint", "resolve_cuda_key", "KEY_ENV"]

logger = get_logger(__name__)

KEY_ENV = "SEP_HF_CUDA_KEY"
PAPER = {"title": "CUDA: Convolution-based Unlearnable Datasets", "url": "https://arxiv.org/abs/2303.04278",
         "authors": "Sadasivan et al., CVPR 2023"}
# PBKDF2 work factor: a guess costs ~0.1 s, so a random key of 40+ bits cannot be recovered from
# the published fingerprint (no hash can protect a key small enough to enumerate).
_FINGERPRINT_ITERATIONS = 200_000
_WEAK_KEY = 2**40
_KEY_HELP = (f"pass --cuda_key_file FILE (a file holding an integer), set ${KEY_ENV}, or --cuda_key N "
             "(visible in the process list); make one with: python -c 'import secrets; print(secrets.randbits(63))'")


@dataclass
class CUDAConfig:
    """Options of CUDA (paper defaults: 3x3 filters, blur 0.3, every image perturbed)."""

    blur: float = field(default=0.3, metadata={"help": "Filter weights are uniform in [0, blur]."})
    kernel_size: int = field(default=3, metadata={"help": "Filter size k (odd)."})
    # Named for what it does: the filtered image keeps its colours (it is not a grayscale image).
    shared_kernel: bool = field(default=True, metadata={"help": "One kernel shared by R, G and B (False: one per channel)."})
    mix: float = field(default=1.0, metadata={"help": "Fraction of the images that are filtered."})
    # The official code's `grayscale` option: the filtered image's channels are averaged (a grey image).
    average_channels: bool = field(default=False, metadata={"help": "Replace every filtered channel by their mean."})

    def __post_init__(self):
        if not self.blur >= 0:
            raise ValueError(f"cuda blur must be >= 0 (paper: 0.3); got {self.blur}: fix --cuda_blur.")
        if self.kernel_size <= 0 or self.kernel_size % 2 == 0:
            raise ValueError(f"cuda kernel_size must be odd and positive (3, 5, ...); got {self.kernel_size}: "
                             "fix --cuda_kernel_size.")
        if not 0 <= self.mix <= 1:
            raise ValueError(f"cuda mix is a fraction in [0, 1]; got {self.mix}: fix --cuda_mix.")


@dataclass
class CUDAArguments:
    """recipes/protect.py flags of ``--method cuda`` (None: the CUDAConfig default)."""

    # A string, parsed here: an argparse int type would echo a mistyped (secret) value in its error.
    cuda_key: str | None = field(default=None, metadata={"help": f"Private integer key (prefer --cuda_key_file or ${KEY_ENV}: flags show in `ps`)."})
    cuda_key_file: str | None = field(default=None, metadata={"help": "File holding the private integer key."})
    cuda_blur: float | None = field(default=None, metadata={"help": "Filter weights uniform in [0, blur] (default 0.3)."})
    cuda_kernel_size: int | None = field(default=None, metadata={"help": "Filter size, odd (default 3)."})
    cuda_shared_kernel: bool | None = field(default=None, metadata={"help": "Same kernel on R, G and B (default true; false: one kernel per channel)."})
    cuda_mix: float | None = field(default=None, metadata={"help": "Fraction of images filtered, picked from key and index (default 1.0)."})
    cuda_average_channels: bool | None = field(default=None, metadata={"help": "The official code's grayscale variant: every output channel is the mean of the filtered channels, so the published images are grey (default false)."})

    def config(self) -> CUDAConfig:
        values = {name: getattr(self, f"cuda_{name}")
                  for name in ("blur", "kernel_size", "shared_kernel", "mix", "average_channels")}
        return CUDAConfig(**{name: value for name, value in values.items() if value is not None})


def _parse_key(text: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        # Never echo the content: it may be a secret of some other kind.
        raise ValueError(f"{where} does not hold an integer CUDA key; {_KEY_HELP}.") from None


def resolve_cuda_key(arguments: CUDAArguments | None, environ=os.environ) -> int:
    """The key from --cuda_key or --cuda_key_file (not both), else $SEP_HF_CUDA_KEY; a clear error if none."""
    arguments = arguments or CUDAArguments()
    if arguments.cuda_key is not None and arguments.cuda_key_file:
        raise ValueError("Pass either --cuda_key or --cuda_key_file, not both.")
    if arguments.cuda_key is not None:
        key = _parse_key(str(arguments.cuda_key), "--cuda_key")
    elif arguments.cuda_key_file:
        path = Path(arguments.cuda_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--cuda_key_file {path} does not exist; {_KEY_HELP}.")
        key = _parse_key(path.read_text(), f"--cuda_key_file {path}")
    elif environ.get(KEY_ENV, "").strip():
        key = _parse_key(environ[KEY_ENV], f"${KEY_ENV}")
    else:
        raise ValueError(f"--method cuda needs a private key: {_KEY_HELP}.")
    if abs(key) < _WEAK_KEY:
        logger.warning("The CUDA key has fewer than 40 bits: anyone can try every such key against the published "
                       "fingerprint (or the data). Use a random 63-bit key for real datasets.")
    return key


def _derive(key: int, purpose: str) -> int:
    """A 62-bit seed for ``purpose`` (domain-separated, so seeds reveal nothing about each other)."""
    digest = hashlib.sha256(f"sep-hf/cuda/{purpose}/v1:{int(key)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def key_fingerprint(key: int) -> str:
    """One-way, deliberately slow fingerprint of the key: identifies it without revealing it."""
    digest = hashlib.pbkdf2_hmac("sha256", str(int(key)).encode(), b"sep-hf/cuda/key-fingerprint/v1",
                                 _FINGERPRINT_ITERATIONS)
    return digest[:8].hex()


def cuda_filters(key: int, num_classes: int, kernel_size: int = 3, blur: float = 0.3,
                 shared_kernel: bool = True) -> torch.Tensor:
    """Class filters (num_classes, 1 or 3, k, k), a pure function of the key and the options."""
    CUDAConfig(blur=blur, kernel_size=kernel_size, shared_kernel=shared_kernel)  # validates
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    generator = torch.Generator().manual_seed(_derive(key, "filters"))
    channels = 1 if shared_kernel else 3
    filters = torch.rand(num_classes, channels, kernel_size * kernel_size, generator=generator) * blur
    taps = torch.randint(0, kernel_size * kernel_size, (num_classes, channels, 1), generator=generator)
    filters.scatter_(2, taps, 1.0)
    return filters.view(num_classes, channels, kernel_size, kernel_size)


def cuda_selected(key: int, indices: torch.Tensor, mix: float) -> torch.Tensor:
    """Which examples are filtered: a per-index coin with P(true) = mix, from the key and the global index only."""
    return _selection(_derive(key, "mix"), indices, mix)


def _selection(seed: int, indices: torch.Tensor, mix: float) -> torch.Tensor:
    if mix >= 1:
        return torch.ones(len(indices), dtype=torch.bool)
    indices = indices.long().cpu()
    hashed = splitmix64(splitmix64(torch.full_like(indices, seed)) + indices)
    uniform = ((hashed >> 40) & 0xFFFFFF).double() / 2**24  # 24 well-mixed bits
    return uniform < mix


def apply_cuda(images: torch.Tensor, labels: torch.Tensor, filters: torch.Tensor,
               selected: torch.Tensor | None = None, average_channels: bool = False) -> torch.Tensor:
    """Filter each image (N, C, H, W) in [0, 1] with its class's filter, rescale by its maximum, round to uint8.

    ``average_channels``: the filtered channels are replaced by their mean before the rescale (the
    official code's ``grayscale`` option).

    One grouped convolution over the whole batch (group = image x channel, each picking its class's
    kernel), so there is no per-image Python loop. ``selected`` (bool, N) leaves the others unchanged.
    Returns float pixels on the 1/255 grid.
    """
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images must be (N, C, H, W) with N = len(labels); got {tuple(images.shape)}, {len(labels)}.")
    num_classes, filter_channels, k, _ = filters.shape
    n, channels, height, width = images.shape
    if filter_channels not in (1, channels):
        raise ValueError(f"filters have {filter_channels} channels, images {channels}"
                         + (": a grayscale dataset has one channel, keep the shared kernel (--cuda_shared_kernel true)."
                            if channels == 1 else "."))
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}): there is one CUDA filter per class.")
    images = images.float()
    weights = filters.to(images.device)[labels.to(images.device)].expand(n, channels, k, k)
    filtered = F.conv2d(images.reshape(1, n * channels, height, width), weights.reshape(n * channels, 1, k, k),
                        padding=k // 2, groups=n * channels).view(n, channels, height, width)
    if average_channels:
        filtered = filtered.mean(1, keepdim=True).expand_as(filtered)
    # Weights are >= 0, so the maximum is the image's brightest output; a black image stays black.
    peak = filtered.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    out = quantize(filtered / peak).float().div_(255.0)
    if selected is not None:
        original = quantize(images).float().div_(255.0)
        out = torch.where(selected.to(images.device).view(-1, 1, 1, 1), out, original)
    return out


@register_protection("cuda")
class CUDATransform(ProtectionTransform):
    """``Dataset.map`` adapter of CUDA. Built from the key, which it does not keep."""

    name = "cuda"
    arguments = CUDAArguments
    paper = PAPER
    protects_all_splits = False  # the training split only, unless --protect_splits asks
    has_budget = False  # a class-wise convolution, not a norm-bounded perturbation

    def __init__(self, key: int, num_classes: int, config: CUDAConfig | None = None, image_column: str = "img",
                 label_column: str = "label", return_stats: bool = False):
        super().__init__(image_column, label_column, return_stats)
        self.config = config or CUDAConfig()
        self.num_classes = num_classes
        self.filters = cuda_filters(key, num_classes, self.config.kernel_size, self.config.blur, self.config.shared_kernel)
        self._selection_seed = _derive(key, "mix")  # a one-way function of the key, never written anywhere
        self.key_fingerprint = key_fingerprint(key)

    def protect(self, images, labels, indices):
        selected = None if self.config.mix >= 1 else _selection(self._selection_seed, indices, self.config.mix)
        return apply_cuda(images, labels, self.filters, selected, self.config.average_channels)

    def fingerprint(self) -> str:
        return config_hash("cuda", asdict(self.config), self.num_classes, self.key_fingerprint)

    def describe(self) -> dict:
        return {**super().describe(),
                "config": {**asdict(self.config), "num_classes": self.num_classes, "key_fingerprint": self.key_fingerprint},
                "budget": "a private class-wise convolution, not a norm-bounded perturbation; --eps does not apply"}

    @classmethod
    def from_arguments(cls, context, name: str = "cuda") -> CUDATransform:
        arguments = context.arguments(CUDAArguments)
        key = resolve_cuda_key(arguments)
        return cls(key, context.columns.num_classes, arguments.config(), image_column=context.columns.image,
                   label_column=context.columns.label, return_stats=True)
