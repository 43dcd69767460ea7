"""The protection job: method -> crafted splits -> a Hub-layout dataset folder -> one Hub commit.

Everything that can fail on bad input (unknown dataset, no labels, bad eps, class-count mismatch,
no write access) is checked before any crafting or upload, and the dataset (parquet shards, card,
sample grid) reaches the Hub in a single commit, so nothing is ever half-published.

Each method builds its own ``ProtectionTransform`` from a ``ProtectionContext`` (the dataset, the
run's folders and accelerator, and shared helpers such as the source checkpoints), so adding a
method touches its own module and the registry only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from sep_hf import hub
from sep_hf.cards import protected_dataset_card, sample_grid_png
from sep_hf.data import DataArguments, ImageDataset, split_to_tensors, uint8_to_float, write_hub_layout
from sep_hf.ensemble import CheckpointEnsemble
from sep_hf.presets import apply_preset
from sep_hf.protections import get_protection, list_protections
from sep_hf.protections.base import STATS_FEATURES, load_shards, protect_split
from sep_hf.runs import HubArguments, RunArguments, run_source_training, write_json
from sep_hf.training import SourceTrainingConfig

__all__ = ["ProtectArguments", "ProtectionContext", "run_protection", "GRID_FILE", "DATASET_DIR"]

logger = logging.getLogger(__name__)

GRID_FILE = "sample_grid.png"
DATASET_DIR = "dataset"
GRID_IMAGES = 8


@dataclass
class ProtectArguments:
    """What to craft and where to publish it. eps and step sizes are in 1/255 units."""

    method: str = field(default="sep-fa-vr", metadata={"help": "Protection method (sep, sep-fa, sep-fa-vr, ...)."})
    eps: float = field(default=8.0, metadata={"help": "L-inf budget in 1/255 units (2, 4, 8, ...)."})
    steps: int | None = field(default=None, metadata={"help": "Crafting steps T (preset: paper 30, cpu 10)."})
    step_size: float | None = field(default=None, metadata={"help": "Step size alpha in 1/255 units (preset: paper 1, cpu 2)."})
    vr_steps: int | None = field(default=None, metadata={"help": "SEP-FA-VR inner steps M (default: the ensemble size)."})
    num_models: int | None = field(default=None, metadata={"help": "Checkpoints K in the ensemble (preset: paper 15, cpu 6)."})
    checkpoints: str | None = field(default=None, metadata={"help": "Source run folder or Hub model repo; none: train one first."})
    checkpoints_revision: str | None = field(default=None, metadata={"help": "Revision of --checkpoints on the Hub."})
    splits: list[str] | None = field(default=None, metadata={"help": "Splits to publish (default: all)."})
    protect_splits: list[str] | None = field(default=None, metadata={"help": "Splits to protect (default: the method's; SEP: all published)."})
    shard_size: int = field(default=1000, metadata={"help": "Rows per resumable crafting shard."})
    craft_batch_size: int = field(default=250, metadata={"help": "Images crafted together."})
    protection_seed: int = field(default=0, metadata={"help": "Seed of per-example random choices (VR picks)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Publish to --hub_dataset_id (else only --output_dir)."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Dataset repo to publish, e.g. my-org/cifar10-sep."})
    hub_private_dataset: bool = field(default=False, metadata={"help": "Create the dataset repo private."})
    hub_source_model_id: str | None = field(default=None, metadata={"help": "Repo for newly trained checkpoints (default: <hub_dataset_id>-source, private)."})

    def __post_init__(self):
        if self.method not in list_protections():
            raise ValueError(f"--method must be one of {', '.join(list_protections())}, not '{self.method}'.")
        if not 0 < self.eps <= 255:
            raise ValueError(f"--eps is in 1/255 units and must be in (0, 255]; got {self.eps}.")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id (e.g. my-org/cifar10-sep).")
        if self.push_to_hub and self.hub_source_model_id is None:
            self.hub_source_model_id = f"{self.hub_dataset_id}-source"


@dataclass
class ProtectionContext:
    """What a method may use to build its transform; expensive parts are computed on first use."""

    args: ProtectArguments
    method_args: object | None  # the method's own argument dataclass instance, if it has one
    dataset: ImageDataset
    data_args: DataArguments
    source_config: SourceTrainingConfig
    run_args: RunArguments
    accelerator: object
    output_dir: Path
    wall: dict

    @cached_property
    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean training images (uint8) and labels that are protected, decoded once."""
        train = self.dataset.split(self.data_args.train_split)
        return split_to_tensors(train, self.dataset.columns, self.data_args.max_train_samples, self.data_args.resize)

    def ensemble(self) -> CheckpointEnsemble:
        """The source checkpoints: --checkpoints, or a source run trained (and pushed) here first."""
        args, accelerator = self.args, self.accelerator
        if args.checkpoints:
            ensemble = CheckpointEnsemble.from_pretrained(args.checkpoints, num_models=args.num_models,
                                                          revision=args.checkpoints_revision, device=accelerator.device)
        else:
            start = time.perf_counter()
            source_run = RunArguments(output_dir=str(self.output_dir / "source"), preset=self.run_args.preset,
                                      mixed_precision=self.run_args.mixed_precision,
                                      gradient_accumulation_steps=self.run_args.gradient_accumulation_steps)
            source_hub = HubArguments(push_to_hub=args.push_to_hub, hub_model_id=args.hub_source_model_id,
                                      hub_private_repo=True)
            run_source_training(self.source_config, self.data_args, source_run, source_hub, accelerator)
            self.wall["source_training"] = time.perf_counter() - start
            ensemble = CheckpointEnsemble.from_pretrained(self.output_dir / "source", num_models=args.num_models,
                                                          device=accelerator.device)
            if args.push_to_hub:  # record where the published checkpoints live, not a local path
                ensemble.source = args.hub_source_model_id
                ensemble.revision = hub.repo_commit_sha(args.hub_source_model_id)
        if ensemble.num_classes != self.dataset.columns.num_classes:
            raise ValueError(
                f"The checkpoints ({ensemble.source}) have {ensemble.num_classes} classes but dataset "
                f"'{self.data_args.dataset}' has {self.dataset.columns.num_classes}: train the source on this dataset."
            )
        if list(ensemble.class_names) != list(self.dataset.columns.class_names):
            logger.warning("Checkpoint class names %s differ from the dataset's %s", ensemble.class_names[:3],
                           self.dataset.columns.class_names[:3])
        return ensemble


def _published_splits(dataset: ImageDataset, args: ProtectArguments, data_args: DataArguments) -> dict:
    names = args.splits or list(dataset.splits)
    splits = {}
    for name in names:
        split = dataset.split(name)
        limit = data_args.max_train_samples if name == data_args.train_split else data_args.max_eval_samples
        splits[name] = split.select(range(min(limit, split.num_rows))) if limit else split
    return splits


def _split_stats(split) -> dict:
    extra = [c for c in ("checkpoints_predicting_target",) if c in split.column_names]
    columns = split.select_columns(list(STATS_FEATURES) + extra).with_format("numpy")[:]
    stats = {"num_examples": split.num_rows, "max_linf": int(columns["linf"].max()),
             "mean_psnr": float(columns["psnr"].mean()), "mean_l2": float(columns["l2"].mean())}
    if extra:
        stats["mean_checkpoints_predicting_target"] = float(columns["checkpoints_predicting_target"].mean())
    return stats


def budget_text(eps: float | None) -> str:
    """How a result states its budget: ``eps 8/255``, or that the method has none (CUDA)."""
    return f"eps {eps:g}/255" if eps is not None else "no L-inf budget"


def run_protection(
    args: ProtectArguments,
    data_args: DataArguments,
    source_config: SourceTrainingConfig,
    run_args: RunArguments,
    accelerator,
    method_args: object | None = None,
) -> dict | None:
    """Protect a dataset and publish it; returns results.json's content on the main process."""
    train_here_with_all_checkpoints = args.checkpoints is None and args.num_models is None
    apply_preset(run_args.preset, args, data_args, source_config)
    if train_here_with_all_checkpoints:  # the run's own K checkpoints, whatever --num_checkpoints says
        args.num_models = None
    output_dir = Path(run_args.output_dir)
    wall: dict[str, float] = {}
    _, transform_cls = get_protection(args.method)

    # Validate everything before spending compute or touching the Hub
    with accelerator.main_process_first():
        dataset = data_args.load()
    if args.push_to_hub and accelerator.is_main_process:
        hub.ensure_repo(args.hub_dataset_id, "dataset", private=args.hub_private_dataset)
    splits = _published_splits(dataset, args, data_args)
    protect_names = args.protect_splits or (list(splits) if transform_cls.protects_all_splits else [data_args.train_split])
    unknown = sorted(set(protect_names) - set(splits))
    if unknown:
        raise ValueError(f"--protect_splits {unknown} are not published splits ({', '.join(splits)}).")

    # The method prepares itself (checkpoints and class means, a key, fitted noise, ...)
    context = ProtectionContext(args, method_args, dataset, data_args, source_config, run_args, accelerator,
                                output_dir, wall)
    start = time.perf_counter()
    transform = transform_cls.from_arguments(context)
    wall["preparation"] = time.perf_counter() - start - wall.get("source_training", 0.0)

    # Crafting: each process takes every N-th shard; finished shards survive a kill
    start = time.perf_counter()
    shard_paths = {
        name: protect_split(splits[name], transform, output_dir / "shards" / name, args.shard_size,
                            args.craft_batch_size, accelerator.process_index, accelerator.num_processes,
                            desc=f"{args.method} {name} (process {accelerator.process_index})")
        for name in protect_names
    }
    accelerator.wait_for_everyone()
    wall["crafting"] = time.perf_counter() - start
    if not accelerator.is_main_process:
        return None

    # Assemble, describe and publish (main process)
    import datasets

    start = time.perf_counter()
    crafted = {name: load_shards(paths) for name, paths in shard_paths.items()}
    split_stats = {name: _split_stats(split) for name, split in crafted.items()}
    source_columns = next(iter(splits.values())).column_names
    protected = datasets.DatasetDict({
        name: crafted[name].remove_columns([c for c in crafted[name].column_names if c not in source_columns])
        if name in crafted else split for name, split in splits.items()
    })
    first = protect_names[0]
    clean = uint8_to_float(split_to_tensors(splits[first], dataset.columns, GRID_IMAGES)[0])
    shown = uint8_to_float(split_to_tensors(protected[first], dataset.columns, GRID_IMAGES)[0])
    results = {
        "method": args.method, "eps": args.eps, "steps": args.steps, "step_size": args.step_size,
        "protected_splits": protect_names, "splits": split_stats,
        "counts": {name: split.num_rows for name, split in protected.items()},
        "max_linf": max(s["max_linf"] for s in split_stats.values()),
        "mean_psnr": sum(s["mean_psnr"] * s["num_examples"] for s in split_stats.values())
        / sum(s["num_examples"] for s in split_stats.values()),
        **transform.describe(),  # may override eps/steps/step_size where they do not apply (None)
        "dataset": dataset.dataset_id, "dataset_revision": dataset.revision, "preset": run_args.preset,
        "num_processes": accelerator.num_processes, "hub_dataset_id": args.hub_dataset_id if args.push_to_hub else None,
        "victims": [],
    }
    folder = output_dir / DATASET_DIR
    card_data, body = protected_dataset_card(results, dataset.dataset_id, dataset.revision, GRID_FILE)
    write_hub_layout(protected, folder, card_data, body)
    # A method without an L-inf budget (describe() sets eps None, e.g. CUDA) scales the grid to its largest change
    budget = results["eps"] if results["eps"] is not None else max(results["max_linf"], 1)
    (folder / GRID_FILE).write_bytes(sample_grid_png(clean, shown, budget / 255))
    if args.push_to_hub:
        results["hub_revision"] = hub.upload_folder(args.hub_dataset_id, folder, "dataset",
                                                    f"Publish {args.method} protection ({budget_text(results['eps'])})",
                                                    delete_patterns=["data/*"])
    wall["publishing"] = time.perf_counter() - start
    results["wall_seconds"] = wall
    write_json(output_dir / "results.json", results)
    return results
