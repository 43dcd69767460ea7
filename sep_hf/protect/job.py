"""The protection job: method -> crafted splits -> a Hub-layout dataset folder -> one Hub commit.

Everything that can fail on bad input (unknown dataset or method, no labels, a budget below one
level, undecodable images, an ensemble larger than the source keeps, an output folder or a Hub repo
that cannot be written) is checked before any crafting or upload; the dataset (parquet shards, card,
sample grid) is written to a staging folder renamed into ``dataset/`` whole and reaches the Hub in a
single commit, so nothing is ever half-written or half-published. Every published image is decoded once before any compute (``ProtectionContext.scan``:
sizes, mode, labels); source training and class means read the models' view (every image at the
models' input size, in memory or batch by batch, ``ProtectionContext.tensors``), and crafting reads
each shard's images from the Arrow table at their own resolution (``protect_split``), so memory
depends on the batch and shard sizes, not on the number of images.

Images are crafted in the source's mode (``ProtectionContext.mode``): a grayscale (L) dataset is
decoded to one channel, its source model is trained with a one-channel stem, and it is published
as L; an alpha channel (RGBA, LA) is split off before anything sees the pixels and written back
unchanged, so only the colour channels carry the perturbation and the budget holds on every pixel.

Each method builds its own ``ProtectionTransform`` from a ``ProtectionContext`` (the decoded data,
the run's folders and accelerator, its own parsed flags, and shared services such as the source
checkpoints), so adding a method touches its own module only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import datasets
import torch
from huggingface_hub import DatasetCard
from huggingface_hub.errors import HfHubHTTPError

from sep_hf.arguments import RESULTS_FILE, HubArguments, RunArguments
from sep_hf.budget import Budget
from sep_hf.data.images import decode_batch, encoded_bytes, uint8_to_float, undecoded, union_mode
from sep_hf.data.load import DatasetError, ImageDataset, public_name
from sep_hf.data.view import (
    DataArguments,
    ImageRows,
    TrainingData,
    colour_mode,
    evaluation_split,
    first_rows,
    held_out_rows,
    model_size,
    model_view,
    scan_split,
)
from sep_hf.protect import check_method_flags, get_protection, list_protections
from sep_hf.protect.audit import probe_audit
from sep_hf.protect.base import load_shards, protect_split, split_summary
from sep_hf.protect.ensemble import CheckpointEnsemble, near_chance, near_chance_advice
from sep_hf.publish import hub
from sep_hf.publish.cards import keep_owner_card, protected_dataset_card, sample_grid_png
from sep_hf.publish.folder import embed_image_bytes, write_hub_layout
from sep_hf.publish.hub import HubError
from sep_hf.source.checkpoints import evenly_spaced, list_checkpoints
from sep_hf.source.job import run_source_training
from sep_hf.source.recipe import SourceTrainingConfig
from sep_hf.utils.flags import whole_number
from sep_hf.utils.io import atomic_folder, check_writable, write_json
from sep_hf.utils.logging import get_logger
from sep_hf.utils.presets import apply_preset
from sep_hf.utils.runtime import resolve_mixed_precision

__all__ = ["ProtectArguments", "ProtectionContext", "run_protection", "check_protect_flags", "budget_text", "GRID_FILE", "DATASET_DIR"]

logger = get_logger(__name__)

GRID_FILE = "sample_grid.png"
DATASET_DIR = "dataset"
GRID_IMAGES = 8
# Published bytes above this multiple of the source's are said before publishing
SIZE_WARNING_RATIO = 2.0
# The appropriator of 2026: a public ImageNet backbone (the README's and the matrix's lite2)
AUDIT_MODEL = "hf-hub:timm/tf_efficientnet_lite2.in1k"
# A protected split whose mean |delta| is below this fraction of the budget is not published.
MIN_PERTURBATION = 0.1


@dataclass
class ProtectArguments:
    """What every method shares: which method, which splits, how to shard, where to publish.

    A method's own flags (SEP's --steps, CUDA's --cuda_key, ...) are its own dataclass, beside it.
    """

    method: str = field(default="sep-fa-vr", metadata={"help": f"Protection method: {' | '.join(list_protections())} "
                                                               "(a+b crafts b on the output of a)."})
    eps: float | None = field(default=None, metadata={"help": "L-inf budget in whole 1/255 levels (2, 4, 8; default 8) for methods that have one."})
    splits: list[str] | None = field(default=None, metadata={"help": "Splits to publish (default: all)."})
    protect_splits: list[str] | None = field(default=None, metadata={"help": "Splits to protect (default: the method's; SEP: all published)."})
    shard_size: int = field(default=1000, metadata={"help": "Rows per resumable crafting shard."})
    craft_batch_size: int = field(default=250, metadata={"help": "Images crafted together."})
    protection_seed: int = field(default=0, metadata={"help": "Seed of per-example random choices (VR picks)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Publish to --hub_dataset_id (else only --output_dir)."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Dataset repo to publish, e.g. my-org/cifar10-sep."})
    # None: not given, so an existing repo's visibility is left alone; "nargs"/"const" keep a bare flag meaning true
    hub_private_dataset: bool | None = field(default=None, metadata={"nargs": "?", "const": True, "help": "Make the dataset repo private (true) or public (false). Not given: an existing repo keeps its visibility, a new one is public."})
    hub_squash_history: bool = field(default=False, metadata={"help": "After the upload, squash the dataset repo's history into one commit (HfApi.super_squash_history; cannot be undone), so its earlier revisions (e.g. the unprotected originals) no longer load."})
    hub_source_model_id: str | None = field(default=None, metadata={"help": "Repo for newly trained checkpoints (default: <hub_dataset_id>-source, private)."})
    hub_allow_public_source: bool = field(default=False, metadata={"help": "Allow pushing the source checkpoints to an existing PUBLIC repo (they can undo the protection)."})
    license: str | None = field(default=None, metadata={"help": "License of the published dataset, a Hub license id (cc-by-4.0, mit, other, ...); default: the source dataset card's."})
    audit_model: str = field(default=AUDIT_MODEL, metadata={"help": "Backbone of the self-audit: a linear probe on its features, trained on the protected and on the clean training images, evaluated on clean images, reported on the card and in results.json ('none': no audit; one that cannot be loaded: 'not audited')."})
    audit_image_size: int | None = field(default=None, metadata={"help": "Input size of the audit's backbone (default: its weights' size; the cpu preset: 128)."})

    PRESETS: ClassVar[dict] = {"cpu": {"audit_image_size": 128}}

    def __post_init__(self):
        get_protection(self.method)  # raises, listing the registered methods
        for name in ("shard_size", "craft_batch_size"):  # 0 or -1 would fail only after compute
            whole_number(getattr(self, name), f"--{name}")
        if self.eps is not None and not 0 < self.eps <= 255:
            Budget.from_eps(self.eps)  # raises now, at parsing (below one level is the method's question: _check_budget)
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id (e.g. my-org/cifar10-sep).")
        if self.hub_squash_history and not self.push_to_hub:
            raise ValueError("--hub_squash_history needs --push_to_hub and --hub_dataset_id: it squashes that repo's history.")
        if self.push_to_hub and self.hub_source_model_id is None:
            self.hub_source_model_id = f"{self.hub_dataset_id}-source"

    @property
    def budget(self) -> Budget:
        """The budget actually applied (whole 1/255 levels; ValueError below one level)."""
        return Budget.from_eps(self.eps)


@dataclass
class ProtectionContext:
    """What a method may use to build its transform; expensive parts are computed once, on first use."""

    args: ProtectArguments
    parsed: list  # every parsed method flag dataclass (recipes/protect.py parses them all)
    dataset: ImageDataset
    data_args: DataArguments
    source_config: SourceTrainingConfig
    run_args: RunArguments
    accelerator: object
    output_dir: Path
    wall: dict
    scans: dict = field(default_factory=dict)  # split name -> SplitScan of its published rows (sizes, labels)
    mode: str | None = None  # the published mode (L, LA, RGB, RGBA): the published splits' union
    size: tuple[int, int] | None = None  # the models' input size (--image_size or the images' one size)
    splits: dict = field(default_factory=dict)  # split name -> its published rows (datasets.Dataset)
    _views: dict = field(default_factory=dict)
    _arguments: dict = field(default_factory=dict)
    _ensembles: dict = field(default_factory=dict)

    @property
    def columns(self):
        return self.dataset.columns

    @property
    def budget(self) -> Budget:
        return self.args.budget

    @property
    def eps(self) -> float:
        """The budget in [0, 1] pixel units, what methods' configs take."""
        return self.budget.pixels

    @property
    def seed(self) -> int:
        return self.args.protection_seed

    @property
    def bf16(self) -> bool:
        """bf16 autocast in crafting unless --mixed_precision no (the fp32 switch)."""
        return resolve_mixed_precision(self.run_args.mixed_precision, use_cpu=self.accelerator.device.type == "cpu") \
            not in ("no", None)

    @property
    def native_size(self) -> bool:
        """Every published image has the models' input size (as CIFAR-10): nothing is resized for the models."""
        return all(scan.uniform_size == self.size for scan in self.scans.values())

    def arguments(self, cls: type):
        """The parsed instance of a method's flag dataclass (defaults if absent), its preset applied once."""
        if cls not in self._arguments:
            instance = next((item for item in self.parsed if type(item) is cls), None) or cls()
            apply_preset(self.run_args.preset, instance)
            self._arguments[cls] = instance
        return self._arguments[cls]

    def scan(self, splits: dict) -> None:
        """Decode every published image once, before any compute (bad images and labels fail here), and
        fix the published mode (the union of the splits' own: one RGB image makes the dataset RGB) and
        the models' input size."""
        for name, split in splits.items():
            self.scans[name] = scan_split(split, self.columns, resize=self.data_args.resize, desc=f"Checking {name}")
        self.splits.update(splits)
        self.mode = union_mode(scan.mode for scan in self.scans.values())
        self.size = model_size(self.scans.values(), self.data_args)

    def tensors(self, name: str) -> tuple[torch.Tensor | ImageRows, torch.Tensor]:
        """A published split's images in the models' view (uint8 colour channels at ``size``: a tensor, or
        ``ImageRows`` beyond --keep_in_memory_mb) and its labels, decoded once."""
        if name not in self._views:
            images = model_view(self.splits[name], self.columns, colour_mode(self.mode), self.size,
                                self.data_args.resize, self.data_args.keep_in_memory_mb, desc=f"Decoding {name}")
            self._views[name] = (images, torch.from_numpy(self.scans[name].labels))
        return self._views[name]

    @property
    def train_tensors(self) -> tuple[torch.Tensor | ImageRows, torch.Tensor]:
        """The clean training images (models' view, uint8) and labels that are protected."""
        return self.tensors(self.data_args.train_split)

    def source_data(self) -> TrainingData:
        """What the source trains and is evaluated on: the training split and the test (else validation)
        split, or, with neither published, the training split less a held-out part it is evaluated on."""
        images, labels = self.train_tensors
        eval_name = evaluation_split(self.dataset, self.data_args)
        if eval_name in self.splits:
            eval_images, eval_labels = self.tensors(eval_name)
        elif eval_name is not None:  # an evaluation split that is not published
            split = first_rows(self.dataset.split(eval_name), self.data_args.max_eval_samples)
            eval_scan = scan_split(split, self.columns, resize=self.data_args.resize, desc=f"Checking {eval_name}")
            eval_images = model_view(split, self.columns, colour_mode(self.mode), self.size, self.data_args.resize,
                                     self.data_args.keep_in_memory_mb, desc=f"Decoding {eval_name}")
            eval_labels = torch.from_numpy(eval_scan.labels)
        else:
            rows, held_out, eval_name = held_out_rows(len(labels), self.data_args)
            eval_images, eval_labels = _take(images, held_out), labels[held_out]
            images, labels = _take(images, rows), labels[rows]
        return TrainingData(images, labels, eval_images, eval_labels, self.columns.class_names, self.dataset.dataset_id,
                            self.dataset.revision, eval_split=eval_name)

    def check_ensemble_size(self, checkpoints: str | None, num_models: int | None, origin: str) -> None:
        """Before any compute: an ensemble of ``num_models`` checkpoints (None: all) must be possible, from a
        local --checkpoints folder or from the source run trained here. ``origin`` says where the number came
        from (--num_models, or a preset). A Hub repo's checkpoints are counted when it is read."""
        if num_models is None:
            return
        whole_number(num_models, "--num_models")
        if checkpoints:
            folder = Path(checkpoints).expanduser()
            available = list_checkpoints(folder) if folder.is_dir() else []  # none: loading them says why
            if available:  # the one picker refuses too many, as loading them would
                evenly_spaced(available, num_models)
            return
        config = self.source_config
        kept = len(config.checkpoint_epochs())
        if num_models > kept:
            longer = f" and --epochs {num_models} or more" if num_models > config.epochs else ""
            raise ValueError(f"The ensemble takes {num_models} checkpoints ({origin}) but the source trained here keeps "
                             f"the {kept} checkpoints of --num_checkpoints {config.num_checkpoints} over --epochs "
                             f"{config.epochs}: pass --num_models {kept} or fewer, or --num_checkpoints {num_models}{longer}.")

    def ensemble(self, checkpoints: str | None, revision: str | None, num_models: int | None) -> CheckpointEnsemble:
        """The source checkpoints: ``checkpoints``, or a source run trained (and pushed) here first."""
        key = (checkpoints, revision, num_models)
        if key not in self._ensembles:
            self._ensembles[key] = self._load_or_train_ensemble(checkpoints, revision, num_models)
        return self._ensembles[key]

    def _load_or_train_ensemble(self, checkpoints, revision, num_models) -> CheckpointEnsemble:
        args, accelerator = self.args, self.accelerator
        if checkpoints:
            ensemble = CheckpointEnsemble.from_pretrained(checkpoints, num_models=num_models, revision=revision,
                                                          device=accelerator.device)
        else:
            start = time.perf_counter()
            source_run = RunArguments(output_dir=str(self.output_dir / "source"), preset=self.run_args.preset,
                                      mixed_precision=self.run_args.mixed_precision,
                                      gradient_accumulation_steps=self.run_args.gradient_accumulation_steps)
            source_hub = HubArguments(push_to_hub=args.push_to_hub, hub_model_id=args.hub_source_model_id)
            data = self.source_data()
            run_source_training(self.source_config, self.data_args, source_run, source_hub, accelerator, data=data,
                                allow_public_repo=args.hub_allow_public_source)
            self.wall["source_training"] = time.perf_counter() - start
            ensemble = CheckpointEnsemble.from_pretrained(self.output_dir / "source", num_models=num_models,
                                                          device=accelerator.device)
            # Record where the checkpoints live for the card: the (private) Hub repo, never a local path.
            ensemble.source = args.hub_source_model_id if args.push_to_hub else "a local source run (not published)"
            if args.push_to_hub:
                ensemble.revision = hub.repo_commit_sha(args.hub_source_model_id)
        channels = 1 if colour_mode(self.mode) == "L" else 3  # colour channels the models see
        if ensemble.in_chans not in (channels, 3):  # 3: a grey image is fed as grey on R, G and B (broadcast)
            raise ValueError(
                f"The checkpoints ({public_name(ensemble.source)}) take {ensemble.in_chans}-channel images but dataset "
                f"'{self.data_args.dataset}' is {self.mode} ({channels} colour channel(s)): train the source on this dataset.")
        if ensemble.num_classes != self.columns.num_classes:
            raise ValueError(
                f"The checkpoints ({public_name(ensemble.source)}) have {ensemble.num_classes} classes but dataset "
                f"'{self.data_args.dataset}' has {self.columns.num_classes}: train the source on this dataset."
            )
        held_out = ensemble.held_out_accuracy
        if held_out and near_chance(held_out["accuracy"][-1], ensemble.num_classes) and accelerator.is_main_process:
            logger.warning("Before crafting: %s.", near_chance_advice(held_out))
        if list(ensemble.class_names) != list(self.columns.class_names):
            logger.warning("Checkpoint class names %s differ from the dataset's %s", ensemble.class_names[:3],
                           self.columns.class_names[:3])
        return ensemble


def published_size(splits: dict, protected: datasets.DatasetDict, columns) -> dict:
    """Bytes of the source's images as stored (JPEG, PNG, ...) against the protected dataset's (PNG rows, Arrow
    size: what the parquet files hold within a few percent), for every published split."""
    source = sum(encoded_bytes(split, columns) for split in splits.values())
    published = sum(split.data.nbytes for split in protected.values())
    return {"source_bytes": source, "published_bytes": published, "ratio": published / max(source, 1),
            "format": "PNG (lossless)"}


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def audit_protection(context: ProtectionContext, protected: datasets.DatasetDict, protect_names: list[str]) -> dict:
    """results.json's ``audit`` (``victim.audit.probe_audit``): the probe on the protected training rows against the
    same rows clean, on the clean evaluation images the source is evaluated on; or why there is none."""
    model, train = context.args.audit_model, context.data_args.train_split
    if model.lower() == "none":
        return {"audited": False, "model": None, "reason": "turned off (`--audit_model none`)"}
    if train not in protect_names:
        return {"audited": False, "model": model, "reason": f"the training split `{train}` is not protected"}
    clean = context.source_data()
    protected_images = model_view(protected[train], context.columns, colour_mode(context.mode), context.size,
                                  context.data_args.resize, context.data_args.keep_in_memory_mb, desc="Decoding the protected images")
    if len(protected_images) != len(clean.train_labels):  # no evaluation split: the source's held-out rows are left out
        rows, _, _ = held_out_rows(len(protected_images), context.data_args)
        protected_images = _take(protected_images, rows)
    size = context.args.audit_image_size
    return probe_audit(model, protected_images, clean, None if size is None else (size, size),
                       device=context.accelerator.device, bf16=context.bf16)


def _take(images, rows: list[int]):
    """Rows of a models'-view image set: a tensor is indexed, ``ImageRows`` selects them lazily."""
    if isinstance(images, ImageRows):
        return ImageRows(images.source.select(rows), images.columns, images.mode, images.size, images.resize)
    return images[torch.as_tensor(rows, dtype=torch.long)]


def _resolution(context: ProtectionContext) -> str:
    """How the card states the published resolution against the models' size."""
    size = "x".join(map(str, context.size))
    if context.data_args.resize is not None:
        return f"every image resized to {'x'.join(map(str, context.data_args.resize))} (--resize) and published at that size"
    if context.native_size:
        return f"native ({size}, the models' input size)"
    return (f"native: every image is protected and published at its own size; the models saw it resized to {size} "
            "(antialiased bilinear) and the perturbation was crafted through that resize")


def budget_text(eps: int | None) -> str:
    """How a result states its budget: ``eps 8/255``, or that the method has none (CUDA)."""
    return f"eps {eps}/255" if eps is not None else "no L-inf budget"


def check_protect_flags(args: ProtectArguments, method_args: list | tuple = ()) -> type:
    """The method, its flags and its budget, checked from the flags alone; returns the method's class.

    ``sep-hf protect`` calls it before building the Accelerator: a user error must be the one line about
    the flag, whatever accelerate's process-wide state says."""
    transform_cls = get_protection(args.method)
    check_method_flags(args.method, method_args)  # another method's flag would do nothing
    _check_budget(args, transform_cls)
    return transform_cls


def _check_budget(args: ProtectArguments, transform_cls: type) -> None:
    if not transform_cls.has_budget:
        if args.eps is not None:
            raise ValueError(f"--method {args.method} has no L-inf budget: drop --eps.")
        return
    args.budget  # noqa: B018 (raises below one level)


def _warn_off_grid_budget(args: ProtectArguments, transform_cls: type) -> None:
    """Once, from the main process (the checks above also run in every process before the Accelerator exists)."""
    if transform_cls.has_budget and args.eps is not None and args.eps != args.budget.levels:
        logger.warning("--eps %g is applied as %s: budgets are whole 1/255 levels.", args.eps, args.budget)


def _check_perturbed(name: str, summary: dict, transform) -> None:
    """Refuse to publish a split that came out (almost) unchanged: it would be labelled protected."""
    eps_levels = transform.describe().get("eps")
    floor = MIN_PERTURBATION * eps_levels if eps_levels else 0.0
    if summary["max_linf"] == 0 or summary["mean_linf"] < floor:
        raise RuntimeError(
            f"Split '{name}' came out almost unperturbed (max L-inf {summary['max_linf']}/255, mean "
            f"{summary['mean_linf']:.2f}/255 against a budget of {eps_levels}/255): refusing to publish it as protected."
        )


def _published_splits(dataset: ImageDataset, args: ProtectArguments, data_args: DataArguments) -> dict:
    names = args.splits or list(dataset.splits)
    splits = {}
    for name in names:
        split = dataset.split(name)
        limit = data_args.max_train_samples if name == data_args.train_split else data_args.max_eval_samples
        splits[name] = split.select(range(min(limit, split.num_rows))) if limit else split
    return splits


def _warn_about_history(args: ProtectArguments, in_place: bool) -> None:
    """Before any compute: the dataset repo's earlier revisions stay loadable after the upload, unless squashed."""
    commits, other_refs = hub.repo_history(args.hub_dataset_id, "dataset")
    held = "the unprotected originals" if in_place else "what the repo held before"
    if commits and not args.hub_squash_history:
        logger.warning(
            "Dataset repo '%s' has %d earlier commit(s): after this upload they still hold %s, loadable by anyone "
            "who can read the repo (load_dataset(..., revision=<commit>)). Publish to a new repo (another "
            "--hub_dataset_id), or pass --hub_squash_history to squash its history into one commit after the upload "
            "(HfApi.super_squash_history; cannot be undone).", args.hub_dataset_id, commits, held)
    if other_refs:
        logger.warning("Dataset repo '%s' also has %s, which keep(s) %s whatever happens to its main branch: delete "
                       "them on the Hub (HfApi.delete_branch / delete_tag, or close the pull requests).",
                       args.hub_dataset_id, ", ".join(other_refs), held)


def source_license(dataset: ImageDataset) -> str | None:
    """The license the source dataset's card states (None: no card, or a card without one)."""
    card_path = Path(dataset.dataset_id) / "README.md"
    try:
        if dataset.is_local:
            card = DatasetCard.load(card_path) if card_path.is_file() else None
        else:
            card = hub.load_card(dataset.dataset_id, "dataset") if "README.md" in hub.repo_files(
                dataset.dataset_id, "dataset", dataset.revision) else None
    except (HubError, HfHubHTTPError, OSError, ValueError):
        return None
    return card.data.get("license") if card is not None else None


def run_protection(
    args: ProtectArguments,
    data_args: DataArguments,
    source_config: SourceTrainingConfig,
    run_args: RunArguments,
    accelerator,
    method_args: list | tuple = (),
) -> dict | None:
    """Protect a dataset and publish it; returns results.json's content on the main process.

    ``method_args`` are the parsed method flag dataclasses (``sep_hf.protect.protection_arguments``).
    """
    apply_preset(run_args.preset, data_args, source_config, args)
    wall: dict[str, float] = {}
    transform_cls = check_protect_flags(args, method_args)
    _warn_off_grid_budget(args, transform_cls)
    output_dir = check_writable(run_args.output_dir)  # before any compute: nothing would be kept otherwise

    # Validate everything before spending compute or touching the Hub
    with accelerator.main_process_first():
        dataset = data_args.load()
    if getattr(transform_cls, "needs_other_class", False) and dataset.columns.num_classes < 2:
        raise ValueError(f"--method {args.method} pushes every image towards another class, but dataset "
                         f"'{data_args.dataset}' has {dataset.columns.num_classes} class: it would change nothing.")
    owner_card = None
    if args.push_to_hub and accelerator.is_main_process:  # fail now, not after hours of crafting
        hub.check_write_access(args.hub_dataset_id, "dataset")
        _warn_about_history(args, in_place=dataset.dataset_id == args.hub_dataset_id)
        if dataset.dataset_id == args.hub_dataset_id and "README.md" in hub.repo_files(args.hub_dataset_id, "dataset"):
            owner_card = hub.load_card(args.hub_dataset_id, "dataset")  # protected in place: their card is kept
        if not any(getattr(item, "checkpoints", None) for item in method_args):
            hub.check_write_access(args.hub_source_model_id, "model")
    splits = _published_splits(dataset, args, data_args)
    protect_names = args.protect_splits or (list(splits) if transform_cls.protects_all_splits else [data_args.train_split])
    unknown = sorted(set(protect_names) - set(splits))
    if unknown:
        raise ValueError(f"--protect_splits {unknown} are not published splits ({', '.join(splits)}).")
    context = ProtectionContext(args, list(method_args), dataset, data_args, source_config, run_args, accelerator,
                                output_dir, wall)
    transform_cls.check_arguments(context, args.method)  # e.g. more checkpoints than the source will keep
    start = time.perf_counter()
    context.scan(splits)  # every published image decoded once (a corrupt image or a bad label fails here)
    for name in protect_names:
        labels = context.scans[name].labels
        if len(labels) and labels.min() < 0:
            raise DatasetError(
                f"Split '{name}' has {int((labels < 0).sum())} unlabeled rows (label -1, e.g. row "
                f"{int((labels < 0).nonzero()[0][0])}): a protection needs every label. Publish only labeled splits "
                "(--splits train) or protect only those (--protect_splits train).")
    wall["decoding"] = time.perf_counter() - start

    # The method prepares itself (checkpoints and class means, a key, fitted noise, ...)
    start = time.perf_counter()
    transform = transform_cls.from_arguments(context, args.method)
    wall["preparation"] = time.perf_counter() - start - wall.get("source_training", 0.0)

    # Crafting: each process takes every N-th shard; finished shards survive a kill
    start = time.perf_counter()
    shard_paths = {
        name: protect_split(splits[name], transform, output_dir / "shards" / name, context.mode, args.shard_size,
                            args.craft_batch_size, accelerator.process_index, accelerator.num_processes,
                            desc=f"{args.method} {name} (process {accelerator.process_index})", resize=data_args.resize)
        for name in protect_names
    }
    accelerator.wait_for_everyone()
    wall["crafting"] = time.perf_counter() - start
    if not accelerator.is_main_process:
        return None

    # Assemble, check, describe and publish (main process)

    start = time.perf_counter()
    crafted = {name: load_shards(paths) for name, paths in shard_paths.items()}
    split_stats = {name: split_summary(split, transform) for name, split in crafted.items()}
    for name, summary in split_stats.items():
        _check_perturbed(name, summary, transform)
    source_columns = next(iter(splits.values())).column_names
    protected = datasets.DatasetDict({
        name: crafted[name].remove_columns([c for c in crafted[name].column_names if c not in source_columns])
        if name in crafted else embed_image_bytes(split) for name, split in splits.items()
    })
    # The grid shows what the models see (every image at the model size), clean above protected.
    first = protect_names[0]
    grid_rows = range(min(GRID_IMAGES, protected[first].num_rows))
    clean, shown = (uint8_to_float(decode_batch(undecoded(split.select(grid_rows), dataset.columns)[dataset.columns.image],
                                                colour_mode(context.mode), context.size))
                    for split in (splits[first], protected[first]))
    description = transform.describe()
    results = {
        "method": args.method, "steps": None, "step_size": None, **description,
        "protected_splits": protect_names, "splits": split_stats,
        "counts": {name: split.num_rows for name, split in protected.items()},
        "max_linf": max(s["max_linf"] for s in split_stats.values()),
        "mean_psnr": sum(s["mean_psnr"] * s["num_examples"] for s in split_stats.values())
        / sum(s["num_examples"] for s in split_stats.values()),
        "dataset": public_name(dataset.dataset_id), "dataset_revision": dataset.revision, "preset": run_args.preset,
        "class_encoded": {"column": dataset.class_encoded, "names": list(dataset.columns.class_names)}
        if dataset.class_encoded else None,
        "image_mode": context.mode,
        "image_size": list(context.size), "resolution": _resolution(context),
        "num_processes": accelerator.num_processes, "hub_dataset_id": args.hub_dataset_id if args.push_to_hub else None,
        "victims": [],
    }
    wall["publishing"] = time.perf_counter() - start
    start = time.perf_counter()
    results["audit"] = audit_protection(context, protected, protect_names)
    wall["audit"] = time.perf_counter() - start
    start = time.perf_counter()
    results["size"] = published_size(splits, protected, dataset.columns)
    if results["size"]["ratio"] > SIZE_WARNING_RATIO:
        logger.warning("The dataset is published as lossless PNG: %s for %s of source images (%.1fx).",
                       _megabytes(results["size"]["published_bytes"]), _megabytes(results["size"]["source_bytes"]),
                       results["size"]["ratio"])
    results["license"], results["license_from"] = (args.license, "flag") if args.license else (
        source_license(dataset), "source")
    if results["license"] is None:
        results["license_from"] = None
        logger.warning("The source dataset states no license: the card says 'unknown'; pass --license to set one.")
    folder = output_dir / DATASET_DIR
    card_data, body = protected_dataset_card(results, transform.card_lines(results), GRID_FILE)
    if owner_card is not None:
        card_data, body = keep_owner_card(owner_card, card_data, body)
    # A method without an L-inf budget (e.g. CUDA) scales the grid's perturbation row to its largest change
    budget = results["eps"] if results["eps"] is not None else max(results["max_linf"], 1)
    with atomic_folder(folder) as staging:  # a full disk or a kill leaves the previous dataset/, never part of one
        write_hub_layout(protected, staging, card_data, body)
        (staging / GRID_FILE).write_bytes(sample_grid_png(clean, shown, budget / 255))
    if args.push_to_hub:  # the repo is created only now that there is data to publish (publish_folder: visibility)
        results["hub_revision"] = hub.publish_folder(
            args.hub_dataset_id, folder, "dataset", f"Publish {args.method} protection ({budget_text(results['eps'])})",
            private=args.hub_private_dataset, new_repo_private=False, delete_patterns=["data/*"],
            squash=args.hub_squash_history)
    wall["publishing"] += time.perf_counter() - start
    results["wall_seconds"] = wall
    write_json(output_dir / RESULTS_FILE, results)
    return results
