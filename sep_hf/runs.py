"""Whole jobs the recipes wire together: a source run with resume, Hub pushes and its card.

Recipes parse flags into the dataclasses here and call one function; tests call the same function.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sep_hf import hub
from sep_hf.cards import source_model_card, training_curve_png
from sep_hf.checkpoints import CHECKPOINTS_DIR, RECORD_FILE, Checkpoint, CheckpointError, list_checkpoints
from sep_hf.data import DataArguments, TrainingData, load_training_data
from sep_hf.presets import apply_preset
from sep_hf.training import SourceTrainingConfig, train_source

__all__ = [
    "RunArguments",
    "HubArguments",
    "find_resume_checkpoint",
    "run_source_training",
    "VictimArguments",
    "run_victim",
    "write_json",
]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CURVE_FILE = "training_curve.png"
CARD_FILE = "README.md"


@dataclass
class RunArguments:
    """Where and how a job runs (infrastructure, not hyperparameters)."""

    output_dir: str | None = field(default=None, metadata={"help": "Local output folder (default: runs/<recipe>)."})
    preset: str = field(default="paper", metadata={"help": "Hyperparameter preset: 'paper' (GPU, the SEP paper) or 'cpu' (minutes on 2 cores)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Discard checkpoints of a different earlier run in --output_dir."})
    mixed_precision: str = field(default="auto", metadata={"help": "no | bf16 | fp16 | auto (bf16 where the device runs it fast)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})


@dataclass
class HubArguments:
    push_to_hub: bool = field(default=False, metadata={"help": "Push checkpoints and card to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Model repo for the checkpoints, e.g. my-org/cifar10-sep-source."})
    hub_private_repo: bool = field(default=True, metadata={"help": "Create the repo private (pass 'false' for public)."})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. my-org/cifar10-sep-source).")


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _same_run_keys(config: SourceTrainingConfig, data: TrainingData) -> dict:
    training = asdict(config)
    training.pop("num_checkpoints")  # adding checkpoints later does not change the trajectory
    return {"training_config": training, "dataset": data.dataset_id, "num_train": len(data.train_images)}


def _checkpoint_keys(checkpoint: Checkpoint) -> dict:
    training = dict(checkpoint.record["training_config"])
    training.pop("num_checkpoints", None)
    return {"training_config": training, "dataset": checkpoint.record["dataset"]["id"],
            "num_train": checkpoint.record["dataset"]["num_train"]}


def find_resume_checkpoint(output_dir: str | Path, hub_model_id: str | None = None) -> Checkpoint | None:
    """Latest complete local checkpoint; if the folder has none, the Hub repo's (downloaded into it)."""
    local = list_checkpoints(output_dir)
    if not local and hub_model_id and hub.repo_exists(hub_model_id):
        files = hub.repo_files(hub_model_id)
        if any(name.startswith(f"{CHECKPOINTS_DIR}/") and name.endswith(RECORD_FILE) for name in files):
            logger.info("No local checkpoints in %s; downloading those of %s to resume", output_dir, hub_model_id)
            hub.download_repo(hub_model_id, allow_patterns=f"{CHECKPOINTS_DIR}/*", local_dir=output_dir)
            local = list_checkpoints(output_dir)
    # A checkpoint whose files do not match its record is skipped, never loaded.
    for checkpoint in reversed(local):
        try:
            return checkpoint.verify()
        except CheckpointError as err:
            logger.warning("Skipping %s: %s", checkpoint.path, err)
    return None


def _card_files(run_output: Path, hub_model_id: str | None, data: TrainingData, config: SourceTrainingConfig,
                model_config: dict, history: list[dict]) -> dict[str, bytes]:
    records = [ckpt.record for ckpt in list_checkpoints(run_output)]
    card = source_model_card(hub_model_id, model_config, asdict(config), data.dataset_id, data.dataset_revision,
                             records, history, len(data.train_images), len(data.eval_images), CURVE_FILE)
    files = {CARD_FILE: str(card).encode(), CURVE_FILE: training_curve_png(history)}
    for name, content in files.items():
        (run_output / name).write_bytes(content)
    return files


def run_source_training(
    config: SourceTrainingConfig,
    data_args: DataArguments,
    run_args: RunArguments,
    hub_args: HubArguments,
    accelerator,
    data: TrainingData | None = None,
) -> dict:
    """Train (or resume) the source model, save checkpoints, card and results.json, push if asked."""
    apply_preset(run_args.preset, config, data_args)
    output_dir = Path(run_args.output_dir)
    if data is None:
        with accelerator.main_process_first():
            data = load_training_data(data_args)

    resume = None
    if accelerator.is_main_process:
        resume = find_resume_checkpoint(output_dir, hub_args.hub_model_id if hub_args.push_to_hub else None)
        if resume is not None and _checkpoint_keys(resume) != _same_run_keys(config, data):
            if not run_args.overwrite_output_dir:
                raise CheckpointError(
                    f"{output_dir} holds checkpoints of a different run ({resume.path}); use another "
                    "--output_dir or --overwrite_output_dir to discard them."
                )
            shutil.rmtree(output_dir / CHECKPOINTS_DIR)
            resume = None
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # the main process decided (and maybe downloaded); follow it
        resume = find_resume_checkpoint(output_dir)
        if resume is not None and _checkpoint_keys(resume) != _same_run_keys(config, data):
            resume = None

    uploader = None
    if hub_args.push_to_hub and accelerator.is_main_process:
        hub.ensure_repo(hub_args.hub_model_id, "model", private=hub_args.hub_private_repo)
        uploader = hub.BackgroundUploader(hub_args.hub_model_id)
        on_hub = set(hub.repo_files(hub_args.hub_model_id))
        for checkpoint in list_checkpoints(output_dir):  # pushes a previous run could not finish
            if f"{CHECKPOINTS_DIR}/{checkpoint.path.name}/{RECORD_FILE}" not in on_hub:
                uploader.submit(_checkpoint_files(checkpoint), f"Add checkpoint epoch {checkpoint.epoch} (resumed push)")

    def on_checkpoint(checkpoint: Checkpoint, history: list[dict]) -> None:
        files = _card_files(output_dir, hub_args.hub_model_id, data, config, checkpoint.record["model"], history)
        if uploader is not None:
            uploader.submit({**_checkpoint_files(checkpoint), **files}, f"Add checkpoint epoch {checkpoint.epoch}")

    results = train_source(config, data, output_dir, accelerator, on_checkpoint=on_checkpoint, resume_from=resume)
    if accelerator.is_main_process:
        results.update(dataset=data.dataset_id, dataset_revision=data.dataset_revision,
                       hub_model_id=hub_args.hub_model_id if hub_args.push_to_hub else None, preset=run_args.preset)
        write_json(output_dir / RESULTS_FILE, results)
        files = _card_files(output_dir, hub_args.hub_model_id, data, config, results["model"], results["history"])
        if uploader is not None:
            uploader.submit({**files, RESULTS_FILE: output_dir / RESULTS_FILE}, "Update card and results")
            uploader.wait()
    accelerator.wait_for_everyone()
    return results


def _checkpoint_files(checkpoint: Checkpoint) -> dict[str, Path]:
    prefix = f"{CHECKPOINTS_DIR}/{checkpoint.path.name}"
    return {f"{prefix}/{path.name}": path for path in sorted(checkpoint.path.iterdir()) if path.is_file()}


# ----------------------------------------------------------------------------------------------
# victims


@dataclass
class VictimArguments:
    update_dataset_card: bool = field(default=False, metadata={"help": "Add this victim's accuracy to --dataset's card."})
    clean_reference_accuracy: float | None = field(default=None, metadata={"help": "Accuracy of the same recipe on clean data, for the card."})


def _dataset_card_row(results: dict) -> dict:
    return {key: results.get(key) for key in ("model", "defense", "defense_settings", "num_train", "eval_accuracy",
                                              "hub_model_id", "eval_dataset", "clean_reference_accuracy")}


def _update_dataset_card(dataset: str, row: dict) -> None:
    from huggingface_hub import DatasetCard

    from sep_hf.cards import add_victim_to_dataset_card
    from sep_hf.data import resolve_dataset_name

    dataset_id = resolve_dataset_name(dataset)
    local = Path(dataset_id)
    if local.is_dir():
        card = add_victim_to_dataset_card(DatasetCard.load(local / CARD_FILE), row)
        card.save(local / CARD_FILE)
    else:
        card = add_victim_to_dataset_card(hub.load_card(dataset_id, "dataset"), row)
        hub.push_card(card, dataset_id, "dataset", f"Add victim {row['model']} ({row['defense']}): {row['eval_accuracy']:.4f}")


def run_victim(config, data_args: DataArguments, run_args: RunArguments, hub_args: HubArguments,
               victim_args: VictimArguments) -> dict | None:
    """Train a victim with Trainer, write its card and results.json, push, and fill the dataset card."""
    from accelerate import PartialState

    from sep_hf.cards import accuracy_curve_png, victim_model_card
    from sep_hf.runtime import resolve_mixed_precision
    from sep_hf.victims import train_victim

    apply_preset(run_args.preset, config, data_args)
    state = PartialState()
    output_dir = Path(run_args.output_dir)
    with state.main_process_first():
        data = load_training_data(data_args)
    if hub_args.push_to_hub and state.is_main_process:
        hub.ensure_repo(hub_args.hub_model_id, "model", private=hub_args.hub_private_repo)
    mixed_precision = resolve_mixed_precision(run_args.mixed_precision, use_cpu=not state.device.type == "cuda")
    results = train_victim(config, data, output_dir, mixed_precision=mixed_precision)
    if not state.is_main_process:
        return None
    results.update(
        model=config.model, defense=config.defense, dataset=data.dataset_id, dataset_revision=data.dataset_revision,
        eval_dataset=data.eval_dataset_id or data.dataset_id,
        eval_dataset_revision=data.eval_dataset_revision if data.eval_dataset_id else data.dataset_revision,
        eval_split=data_args.eval_split, preset=run_args.preset, clean_reference_accuracy=victim_args.clean_reference_accuracy,
        hub_model_id=hub_args.hub_model_id if hub_args.push_to_hub else None,
    )
    model_dir = output_dir / "model"
    history = results["history"]
    (model_dir / CURVE_FILE).write_bytes(accuracy_curve_png(
        [row["epoch"] for row in history], [row["eval_accuracy"] for row in history],
        title=f"{config.model} on {data.dataset_id.split('/')[-1]} ({config.defense})"))
    victim_model_card(results["hub_model_id"], results, CURVE_FILE).save(model_dir / CARD_FILE)
    write_json(model_dir / RESULTS_FILE, results)
    write_json(output_dir / RESULTS_FILE, results)
    if hub_args.push_to_hub:
        results["hub_revision"] = hub.upload_folder(hub_args.hub_model_id, model_dir, "model",
                                                    f"Victim {config.model} ({config.defense}): {results['eval_accuracy']:.4f}")
        write_json(output_dir / RESULTS_FILE, results)
    if victim_args.update_dataset_card:
        _update_dataset_card(data_args.dataset, _dataset_card_row(results))
    return results
