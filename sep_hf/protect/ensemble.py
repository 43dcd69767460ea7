"""CheckpointEnsemble: K checkpoints of one training run, in memory, ready for crafting.

Measured on 2 CPU cores (bench/README.md): running the K models one after another, each in
channels_last under bf16 autocast, is 2.8x (small net) to 5.7x (ResNet-18) faster than
``torch.func.vmap`` over stacked weights, which turns every convolution into a grouped one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from sep_hf.models import ImageClassifier, model_from_config
from sep_hf.publish import hub
from sep_hf.source.checkpoints import (
    CHECKPOINTS_DIR,
    MODEL_FILE,
    RECORD_FILE,
    Checkpoint,
    CheckpointError,
    evenly_spaced,
    list_checkpoints,
)
from sep_hf.utils.io import atomic_write
from sep_hf.utils.runtime import autocast

__all__ = ["CheckpointEnsemble", "tensor_hash", "near_chance", "near_chance_advice", "NEAR_CHANCE_SHARE"]

# A source whose last checkpoint is not this share of the way from chance to 100% learned too little to protect
NEAR_CHANCE_SHARE = 0.1


def near_chance(accuracy: float, num_classes: int) -> bool:
    chance = 1 / num_classes
    return accuracy < chance + NEAR_CHANCE_SHARE * (1 - chance)


def near_chance_advice(held_out: dict) -> str:
    """One line for a source near chance: what it means and what to do."""
    return (f"the source model's held-out accuracy is {held_out['accuracy'][-1]:.4f}, near chance "
            f"({held_out['chance']:.4f}): the self-ensemble of a model that learned nothing protects little. Give it "
            "more images, more epochs (--epochs), or a pretrained source (--model hf-hub:...)")

_ARCH_KEYS = ("model_name", "num_classes", "img_size", "mean", "std", "model_kwargs")
_RECORD_PATH = re.compile(rf"^{CHECKPOINTS_DIR}/(epoch-(\d{{3,}}))/{RECORD_FILE}$")


def _default_cache_dir() -> Path:
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return Path(os.environ.get("SEP_HF_CACHE", os.path.join(hf_home, "sep_hf")))


def tensor_hash(*tensors: torch.Tensor) -> str:
    """A short sha256 of tensors' bytes (cache keys of class means)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class CheckpointEnsemble(nn.Module):
    """K models of one architecture (checkpoints of one run), evaluated together.

    Inputs are pixels in [0, 1], shape (N, C, H, W). ``logits(x)`` and ``features(x)`` return
    (K, N, ...) stacks; ``models[k]`` is checkpoint k. All models are in eval mode and frozen.
    """

    def __init__(self, models: list[ImageClassifier], records: list[dict], source: str = ""):
        super().__init__()
        if not models:
            raise CheckpointError("An ensemble needs at least one checkpoint.")
        self.models = nn.ModuleList(models).eval().requires_grad_(False)
        self.records = records
        self.source = source
        self.revision: str | None = None  # Hub commit sha when loaded from a repo
        self.checkpoint_paths: list[Path] = []

    # ------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_checkpoints(cls, checkpoints: list[Checkpoint], device="cpu", source: str = ""):
        reference = checkpoints[0].record
        models = []
        for checkpoint in checkpoints:
            record = checkpoint.record
            for key in _ARCH_KEYS:
                if record["model"].get(key) != reference["model"].get(key):
                    raise CheckpointError(
                        f"Checkpoint {checkpoint.path} has {key}={record['model'].get(key)!r} but "
                        f"{checkpoints[0].path} has {reference['model'].get(key)!r}: an ensemble needs "
                        "checkpoints of one architecture and class count."
                    )
            if record.get("class_names") != reference.get("class_names"):
                raise CheckpointError(f"Checkpoint {checkpoint.path} has different class names than {checkpoints[0].path}.")
            checkpoint.verify([MODEL_FILE])
            model = model_from_config(record["model"])
            model.load_state_dict(checkpoint.load_state_dict())
            models.append(model)
        ensemble = cls(models, [ckpt.record for ckpt in checkpoints], source=source)
        ensemble.checkpoint_paths = [ckpt.path for ckpt in checkpoints]
        return ensemble.to(device)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike,
        num_models: int | None = None,
        revision: str | None = None,
        device="cpu",
    ) -> CheckpointEnsemble:
        """Load ``num_models`` evenly spaced checkpoints (all if None) from a run directory or Hub repo.

        A local ``train_source.py`` output directory (or its ``checkpoints/`` folder) is read in place;
        anything else is a Hub model repo id, of which only the chosen checkpoints' weights and
        records are downloaded (at ``revision``). Each model maps float pixels (N, C, H, W) in [0, 1] to
        logits (N, classes); the ensemble stacks them to (K, N, classes).

        Raises ``CheckpointError`` for a folder or repo without complete checkpoints, a checkpoint whose
        files do not match their sha256, checkpoints of different architectures, or ``num_models`` above
        the number available.
        """
        path = Path(repo_id_or_dir).expanduser()
        if path.exists():
            available = list_checkpoints(path)
            if not available:
                raise CheckpointError(f"No complete checkpoints under {path} (expected {CHECKPOINTS_DIR}/epoch-XXX/).")
            chosen = evenly_spaced(available, num_models)
            return cls.from_checkpoints(chosen, device=device, source=str(path.resolve()))


        repo_id = str(repo_id_or_dir)
        if repo_id.startswith(("/", "./", "../", "~")) or repo_id.count("/") != 1:  # cannot be a Hub id
            raise CheckpointError(f"Checkpoint folder '{repo_id}' does not exist (--checkpoints takes a source run "
                                  "folder or a Hub repo id such as my-org/cifar10-sep-source).")
        try:
            sha = hub.repo_commit_sha(repo_id, "model", revision)
        except hub.HubError as err:
            raise CheckpointError(f"--checkpoints '{repo_id}' is neither a local folder nor a readable Hub model "
                                  f"repo: {err}") from err
        # by epoch number: "epoch-1000" sorts before "epoch-999" as a string
        matches = sorted((m for m in map(_RECORD_PATH.match, hub.repo_files(repo_id, revision=sha)) if m),
                         key=lambda m: int(m.group(2)))
        names = [m.group(1) for m in matches]
        if not names:
            raise CheckpointError(f"Hub repo '{repo_id}' has no {CHECKPOINTS_DIR}/epoch-XXX/{RECORD_FILE}.")
        chosen = evenly_spaced(names, num_models)
        patterns = [f"{CHECKPOINTS_DIR}/{name}/{file}" for name in chosen for file in (MODEL_FILE, RECORD_FILE)]
        local = hub.download_repo(repo_id, revision=sha, allow_patterns=patterns)
        checkpoints = [ckpt for ckpt in list_checkpoints(local) if ckpt.path.name in chosen]
        ensemble = cls.from_checkpoints(checkpoints, device=device, source=repo_id)
        ensemble.revision = sha
        return ensemble

    # ------------------------------------------------------------------------------------------
    # metadata

    @property
    def num_models(self) -> int:
        return len(self.models)

    @property
    def num_classes(self) -> int:
        return self.records[0]["model"]["num_classes"]

    @property
    def in_chans(self) -> int:
        """Input channels of the models (1 for a source trained on grayscale data); a 3-channel model
        also takes 1-channel images, as grey on R, G and B (its normalization broadcasts them)."""
        return len(self.records[0]["model"]["mean"])

    @property
    def class_names(self) -> list[str]:
        return self.records[0].get("class_names", [str(i) for i in range(self.num_classes)])

    @property
    def epochs(self) -> list[int]:
        return [record["epoch"] for record in self.records]

    @property
    def held_out_accuracy(self) -> dict | None:
        """The source's accuracy on its evaluation images at each kept checkpoint (from the records), the number of
        those images and chance (1 / classes); None when the records do not say."""
        accuracy = [record.get("clean_test_accuracy") for record in self.records]
        if None in accuracy:
            return None
        return {"accuracy": [round(float(a), 4) for a in accuracy],
                "num_eval": self.records[-1].get("dataset", {}).get("num_eval"), "chance": 1 / self.num_classes}

    @property
    def content_hashes(self) -> list[str]:
        return [record["files"][MODEL_FILE] for record in self.records]

    @property
    def fingerprint(self) -> str:
        """Identity of the ensemble's weights (order included), without hashing Python objects."""
        return hashlib.sha256(json.dumps(self.content_hashes).encode()).hexdigest()

    @property
    def device(self) -> torch.device:
        return next(self.models.parameters()).device

    def autocast(self, enabled: bool = True):
        """bf16 autocast where it speeds convolutions up (CUDA, and CPUs with AMX/AVX512-BF16)."""
        return autocast(self.device, enabled)

    def to(self, *args, **kwargs):
        result = super().to(*args, **kwargs)
        result.models.to(memory_format=torch.channels_last)
        return result

    # ------------------------------------------------------------------------------------------
    # forward passes: (K, N, ...) stacks

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        return torch.stack([model(x) for model in self.models])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        return torch.stack([model.features(x) for model in self.models])

    forward = logits

    def rows(self, index) -> CheckpointEnsemble:
        """The ensemble as a subset of a batch sees it: the same models (``protections.sep`` gives images
        of different sizes their own input resize, which follows the rows)."""
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Predicted classes, (K, N)."""
        outputs = []
        for start in range(0, len(x), batch_size):
            with self.autocast():
                outputs.append(self.logits(x[start : start + batch_size].to(self.device)).argmax(-1).cpu())
        return torch.cat(outputs, dim=1)

    # ------------------------------------------------------------------------------------------
    # class-mean features for SEP-FA

    @torch.no_grad()
    def class_means(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, cache_dir: str | Path | None = None
    ) -> torch.Tensor:
        """μ[k, c] = mean penultimate feature of class c under checkpoint k, shape (K, C, D), float32.

        ``images`` are the clean training images (uint8 or float in [0, 1]; a tensor or ``data.ImageRows``,
        read one batch at a time) at any size (each model resizes them to its own). Computed once per
        (checkpoint, data) pair, batched, and cached on disk keyed by both content hashes.
        """
        cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir() / "class_means"
        if isinstance(images, torch.Tensor):
            data_hash = tensor_hash(images, labels)[:16]
        else:  # data.ImageRows: decoded batch by batch; its dataset fingerprint names the content
            data_hash = hashlib.sha256(f"{images.fingerprint}-{tensor_hash(labels)}".encode()).hexdigest()[:16]
        paths = [cache_dir / f"{content[:16]}-{data_hash}.safetensors" for content in self.content_hashes]
        missing = [k for k, path in enumerate(paths) if not path.exists()]
        if missing:
            sums, counts = None, torch.bincount(labels, minlength=self.num_classes).double()
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(self.device)
                batch = batch.float().div(255.0) if batch.dtype == torch.uint8 else batch.float()
                with self.autocast():
                    feats = torch.stack([self.models[k].features(self._prepare(batch)) for k in missing]).double()
                index = labels[start : start + batch_size].to(self.device)
                if sums is None:
                    sums = torch.zeros(len(missing), self.num_classes, feats.shape[-1], dtype=torch.float64, device=self.device)
                sums.index_add_(1, index, feats)
            means = (sums / counts.to(self.device).clamp_min(1).view(1, -1, 1)).float().cpu()
            cache_dir.mkdir(parents=True, exist_ok=True)
            for position, k in enumerate(missing):
                tensors = {"class_means": means[position].contiguous()}
                atomic_write(paths[k], lambda tmp, tensors=tensors: save_file(tensors, tmp))
        return torch.stack([load_file(path)["class_means"] for path in paths]).to(self.device)

