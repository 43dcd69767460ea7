"""The protection job: checkpoints -> crafted splits -> a Hub-layout dataset folder -> one Hub commit.

Everything that can fail on bad input (unknown dataset, no labels, bad eps, class-count mismatch,
no write access) is checked before any crafting or upload, and the dataset (parquet shards, card,
sample grid) reaches the Hub in a single commit, so nothing is ever half-published.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
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

__all__ = ["ProtectArguments", "run_protection", "GRID_FILE", "DATASET_DIR"]

logger = logging.getLogger(__name__)

GRID_FILE = "sample_grid.png"
DATASET_DIR = "dataset"
GRID_IMAGES = 8


@dataclass
class ProtectArguments:
    """What to craft and where to publish it. eps and step sizes are in 1/255 units."""

    method: str = field(default="sep-fa-vr", metadata={"help": "Protection method: sep | sep-fa | sep-fa-vr."})
    eps: float = field(default=8.0, metadata={"help": "L-inf budget in 1/255 units (2, 4, 8, ...)."})
    steps: int | None = field(default=None, metadata={"help": "Crafting steps T (preset: paper 30, cpu 10)."})
    step_size: float = field(default=1.0, metadata={"help": "Step size alpha in 1/255 units."})
    vr_steps: int | None = field(default=None, metadata={"help": "SEP-FA-VR inner steps M (default: the ensemble size)."})
    num_models: int | None = field(default=None, metadata={"help": "Checkpoints K in the ensemble (preset: paper 15, cpu 6)."})
    checkpoints: str | None = field(default=None, metadata={"help": "Source run folder or Hub model repo; none: train one first."})
    checkpoints_revision: str | None = field(default=None, metadata={"help": "Revision of --checkpoints on the Hub."})
    splits: list[str] | None = field(default=None, metadata={"help": "Splits to protect and publish (default: all)."})
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

    def method_config(self):
        config_cls, _ = get_protection(self.method)
        return config_cls(method=self.method, eps=self.eps / 255, steps=self.steps, step_size=self.step_size / 255,
                          vr_steps=self.vr_steps, seed=self.protection_seed)


def _published_splits(dataset: ImageDataset, args: ProtectArguments, data_args: DataArguments) -> dict:
    names = args.splits or list(dataset.splits)
    splits = {}
    for name in names:
        split = dataset.split(name)
        limit = data_args.max_train_samples if name == data_args.train_split else data_args.max_eval_samples
        splits[name] = split.select(range(min(limit, split.num_rows))) if limit else split
    return splits


def _load_ensemble(args, data_args, source_config, run_args, accelerator, output_dir: Path, wall: dict):
    if args.checkpoints:
        return CheckpointEnsemble.from_pretrained(args.checkpoints, num_models=args.num_models,
                                                  revision=args.checkpoints_revision, device=accelerator.device)
    start = time.perf_counter()
    source_run = RunArguments(output_dir=str(output_dir / "source"), preset=run_args.preset,
                              mixed_precision=run_args.mixed_precision,
                              gradient_accumulation_steps=run_args.gradient_accumulation_steps)
    source_hub = HubArguments(push_to_hub=args.push_to_hub, hub_model_id=args.hub_source_model_id, hub_private_repo=True)
    run_source_training(source_config, data_args, source_run, source_hub, accelerator)
    wall["source_training"] = time.perf_counter() - start
    ensemble = CheckpointEnsemble.from_pretrained(output_dir / "source", num_models=args.num_models,
                                                  device=accelerator.device)
    if args.push_to_hub:  # record where the published checkpoints live, not a local path
        ensemble.source, ensemble.revision = args.hub_source_model_id, hub.repo_commit_sha(args.hub_source_model_id)
    return ensemble


def _split_stats(split) -> dict:
    columns = split.select_columns(list(STATS_FEATURES) + ["checkpoints_predicting_target"]).with_format("numpy")[:]
    return {
        "num_examples": split.num_rows,
        "max_linf": int(columns["linf"].max()),
        "mean_psnr": float(columns["psnr"].mean()),
        "mean_l2": float(columns["l2"].mean()),
        "mean_checkpoints_predicting_target": float(columns["checkpoints_predicting_target"].mean()),
    }


def run_protection(
    args: ProtectArguments,
    data_args: DataArguments,
    source_config: SourceTrainingConfig,
    run_args: RunArguments,
    accelerator,
) -> dict | None:
    """Protect a dataset and publish it; returns results.json's content on the main process."""
    train_here_with_all_checkpoints = args.checkpoints is None and args.num_models is None
    apply_preset(run_args.preset, args, data_args, source_config)
    if train_here_with_all_checkpoints:  # the run's own K checkpoints, whatever --num_checkpoints says
        args.num_models = None
    output_dir = Path(run_args.output_dir)
    method_config = args.method_config()
    wall: dict[str, float] = {}

    # Validate everything before spending compute or touching the Hub
    with accelerator.main_process_first():
        dataset = data_args.load()
    if args.push_to_hub and accelerator.is_main_process:
        hub.ensure_repo(args.hub_dataset_id, "dataset", private=args.hub_private_dataset)
    splits = _published_splits(dataset, args, data_args)
    ensemble = _load_ensemble(args, data_args, source_config, run_args, accelerator, output_dir, wall)
    if ensemble.num_classes != dataset.columns.num_classes:
        raise ValueError(
            f"The checkpoints ({ensemble.source}) have {ensemble.num_classes} classes but dataset "
            f"'{data_args.dataset}' has {dataset.columns.num_classes}: train the source on this dataset."
        )
    if list(ensemble.class_names) != list(dataset.columns.class_names):
        logger.warning("Checkpoint class names %s differ from the dataset's %s", ensemble.class_names[:3],
                       dataset.columns.class_names[:3])

    # Class-mean features for the FA variants, over the clean training images
    class_means = None
    if getattr(method_config, "uses_features", False):
        start = time.perf_counter()
        train = dataset.split(data_args.train_split)
        with accelerator.main_process_first():
            images, labels = split_to_tensors(train, dataset.columns, data_args.max_train_samples, data_args.resize)
            class_means = ensemble.class_means(images, labels, cache_dir=output_dir / "cache" / "class_means")
        wall["class_means"] = time.perf_counter() - start

    # Crafting: each process takes every N-th shard; finished shards survive a kill
    _, transform_cls = get_protection(args.method)
    transform = transform_cls(ensemble, method_config, class_means=class_means, image_column=dataset.columns.image,
                              label_column=dataset.columns.label, return_stats=True)
    start = time.perf_counter()
    shard_paths = {
        name: protect_split(split, transform, output_dir / "shards" / name, args.shard_size, args.craft_batch_size,
                            accelerator.process_index, accelerator.num_processes,
                            desc=f"{args.method} {name} (process {accelerator.process_index})")
        for name, split in splits.items()
    }
    accelerator.wait_for_everyone()
    wall["crafting"] = time.perf_counter() - start
    if not accelerator.is_main_process:
        return None

    # Assemble, describe and publish (main process)
    import datasets

    start = time.perf_counter()
    protected = datasets.DatasetDict({name: load_shards(paths) for name, paths in shard_paths.items()})
    split_stats = {name: _split_stats(split) for name, split in protected.items()}
    stats_columns = [c for c in next(iter(protected.values())).column_names if c not in splits[next(iter(splits))].column_names]
    protected = protected.remove_columns(stats_columns)
    first = next(iter(splits))
    clean = uint8_to_float(split_to_tensors(splits[first], dataset.columns, GRID_IMAGES)[0])
    shown = uint8_to_float(split_to_tensors(protected[first], dataset.columns, GRID_IMAGES)[0])
    results = {
        "method": args.method, "eps": args.eps, "steps": method_config.steps, "step_size": args.step_size,
        "splits": split_stats, "counts": {name: split.num_rows for name, split in protected.items()},
        "max_linf": max(s["max_linf"] for s in split_stats.values()),
        "mean_psnr": sum(s["mean_psnr"] * s["num_examples"] for s in split_stats.values())
        / sum(s["num_examples"] for s in split_stats.values()),
        "checkpoints": {"source": ensemble.source, "revision": ensemble.revision, "epochs": ensemble.epochs},
        "config": {**asdict(method_config), "num_models": ensemble.num_models},
        "dataset": dataset.dataset_id, "dataset_revision": dataset.revision, "preset": run_args.preset,
        "num_processes": accelerator.num_processes, "hub_dataset_id": args.hub_dataset_id if args.push_to_hub else None,
        "victims": [],
    }
    folder = output_dir / DATASET_DIR
    card_data, body = protected_dataset_card(results, dataset.dataset_id, dataset.revision, GRID_FILE)
    write_hub_layout(protected, folder, card_data, body)
    (folder / GRID_FILE).write_bytes(sample_grid_png(clean, shown, args.eps / 255))
    if args.push_to_hub:
        results["hub_revision"] = hub.upload_folder(args.hub_dataset_id, folder, "dataset",
                                                    f"Publish {args.method} protection (eps {args.eps:g}/255)",
                                                    delete_patterns=["data/*"])
    wall["publishing"] = time.perf_counter() - start
    results["wall_seconds"] = wall
    write_json(output_dir / "results.json", results)
    return results
