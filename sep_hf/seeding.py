"""The package's random numbers: every draw is a pure function of integers, never of global state.

Two kinds, both reproducible for any batch split and any number of processes:

- **Per-example keys** (``draw_keys``): an int64 key per example from (seed, global example index,
  *path) through splitmix64 (Steele et al., "Fast splittable pseudorandom number generators",
  OOPSLA 2014); ``key_uniform`` / ``key_choice`` / ``key_normal_like`` turn keys into draws. Used
  where one example's randomness must not depend on which batch it sits in (SEP's EOT views and
  VR samples, CUDA's per-image choices).
- **Seeded generators** (``seeded_generator(*parts)``): a ``torch.Generator`` seeded by a tuple of
  integers (seed, epoch, step, ...), for whole-batch draws that every process repeats identically
  (data order, crop/flip parameters, EM's noise initialisation).
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_as_int64(v) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (wrapping arithmetic; logical shifts emulated with masks)."""
    x = x + _GOLDEN
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def draw_keys(indices: torch.Tensor, seed: int, *path: int) -> torch.Tensor:
    """One int64 key per example from (seed, global index, *path), e.g. path = (step, checkpoint, sample)."""
    key = splitmix64(torch.full_like(indices.long(), seed) * 1_000_003 + indices.long())
    for part in path:
        key = splitmix64(key * 31 + part)
    return key


def key_uniform(keys: torch.Tensor, salt: int) -> torch.Tensor:
    """A float in [0, 1) per key (53 random bits would be overkill: 31 are plenty here)."""
    return ((splitmix64(keys * 7 + salt) >> 33) & ((1 << 31) - 1)).double().div(2**31).float()


def key_choice(keys: torch.Tensor, salt: int, options: int) -> torch.Tensor:
    """An int in [0, options) per key."""
    return ((splitmix64(keys * 7 + salt) >> 1) % options).long()


def key_normal_like(x: torch.Tensor, keys: torch.Tensor, salt: int) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (N, ...), a function of each example's key (Box-Muller)."""
    per_example = x[0].numel()
    counter = torch.arange(per_example, device=x.device).view(1, -1)
    u1 = key_uniform(keys.view(-1, 1) * per_example + counter, salt).clamp_min(1e-7)
    u2 = key_uniform(keys.view(-1, 1) * per_example + counter, salt + 1)
    normal = (-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)
    return normal.view_as(x).to(x.dtype)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by the integers ``parts`` (e.g. seed, epoch, step)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63)
    return torch.Generator().manual_seed(seed)
