"""The source-run job: train (or resume) the self-ensemble's checkpoints, push them, write the card.

``recipes/train_source.py`` parses flags and calls ``run_source_training``; ``protect.py`` calls it
too (with the data it already decoded) when no ``--checkpoints`` are given.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from sep_hf.arguments import CARD_FILE, CURVE_FILE, RESULTS_FILE, HubArguments, RunArguments, check_pretrained
from sep_hf.data.load import public_name
from sep_hf.data.view import DataArguments, TrainingData, load_training_data
from sep_hf.defenses import build_defense
from sep_hf.publish import hub
from sep_hf.publish.cards import source_model_card, training_curve_png
from sep_hf.source.checkpoints import CHECKPOINTS_DIR, RECORD_FILE, Checkpoint, CheckpointError, list_checkpoints
from sep_hf.source.recipe import SourceTrainingConfig
from sep_hf.source.train import train_source
from sep_hf.utils.io import atomic_write, check_writable, write_json
from sep_hf.utils.logging import get_logger
from sep_hf.utils.presets import apply_preset

__all__ = ["find_resume_checkpoint", "run_source_training"]

logger = get_logger(__name__)

def _same_run_keys(config: SourceTrainingConfig, data: TrainingData) -> dict:
    training = asdict(config)
    training.pop("num_checkpoints")  # adding checkpoints later does not change the trajectory
    return {"training_config": training, "dataset": public_name(data.dataset_id), "num_train": len(data.train_images)}


def _checkpoint_keys(checkpoint: Checkpoint) -> dict:
    training = dict(checkpoint.record["training_config"])
    training.pop("num_checkpoints", None)
    training.setdefault("defense", "none")  # runs from before --defense existed
    # public_name: records written before they held public names only hold the folder's path
    return {"training_config": training, "dataset": public_name(checkpoint.record["dataset"]["id"]),
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
    card = source_model_card(hub_model_id, model_config, asdict(config), public_name(data.dataset_id), data.dataset_revision,
                             records, history, len(data.train_images), len(data.eval_images), CURVE_FILE)
    files = {CARD_FILE: str(card).encode(), CURVE_FILE: training_curve_png(history)}
    for name, content in files.items():
        atomic_write(run_output / name, content)  # a full disk leaves the previous card, never half of one
    return files


def run_source_training(
    config: SourceTrainingConfig,
    data_args: DataArguments,
    run_args: RunArguments,
    hub_args: HubArguments,
    accelerator,
    data: TrainingData | None = None,
    allow_public_repo: bool = False,
    defense_args: list | tuple = (),
) -> dict:
    """Train (or resume) the source model, save checkpoints, card and results.json, push if asked.

    ``data`` skips loading and decoding when the caller already has the tensors. ``defense_args``:
    the parsed defense flag dataclasses of ``config.defense`` (``sep_hf.defenses.defense_arguments``). The checkpoints
    go to a private repo; an existing public one is refused unless ``allow_public_repo``.
    """

    apply_preset(run_args.preset, config, data_args)
    defense = build_defense(config.defense, defense_args)  # before any compute: a wrong flag fails here
    if data is None:
        check_pretrained(config, data_args)  # a pretrained --model that cannot be loaded fails here too
    output_dir = check_writable(run_args.output_dir)  # before any compute: no checkpoint could be kept otherwise
    if hub_args.push_to_hub and accelerator.is_main_process:  # a read-only token fails now, not after training
        hub.check_write_access(hub_args.hub_model_id, "model")
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
        # Checkpoints undo the protection: never into a public repo by accident. A new repo is private; one the
        # user asked public (--hub_private_repo false) is made public once every push landed, so a failed run
        # leaves nothing public.
        hub.ensure_private_repo(hub_args.hub_model_id, "model",
                                allow_public=allow_public_repo or not hub_args.hub_private_repo)
        uploader = hub.BackgroundUploader(hub_args.hub_model_id)
        on_hub = set(hub.repo_files(hub_args.hub_model_id))
        for checkpoint in list_checkpoints(output_dir):  # pushes a previous run could not finish
            if f"{CHECKPOINTS_DIR}/{checkpoint.path.name}/{RECORD_FILE}" not in on_hub:
                uploader.submit(_checkpoint_files(checkpoint), f"Add checkpoint epoch {checkpoint.epoch} (resumed push)")

    def on_checkpoint(checkpoint: Checkpoint, history: list[dict]) -> None:
        files = _card_files(output_dir, hub_args.hub_model_id, data, config, checkpoint.record["model"], history)
        if uploader is not None:
            uploader.submit({**_checkpoint_files(checkpoint), **files}, f"Add checkpoint epoch {checkpoint.epoch}")

    results = train_source(config, data, output_dir, accelerator, on_checkpoint=on_checkpoint, resume_from=resume,
                           defense=defense)
    if accelerator.is_main_process:
        results.update(dataset=public_name(data.dataset_id), dataset_revision=data.dataset_revision,
                       hub_model_id=hub_args.hub_model_id if hub_args.push_to_hub else None, preset=run_args.preset)
        write_json(output_dir / RESULTS_FILE, results)
        files = _card_files(output_dir, hub_args.hub_model_id, data, config, results["model"], results["history"])
        if uploader is not None:
            uploader.submit({**files, RESULTS_FILE: output_dir / RESULTS_FILE}, "Update card and results")
            uploader.wait()
            if not hub_args.hub_private_repo:
                hub.ensure_repo_visibility(hub_args.hub_model_id, "model", private=False)
    accelerator.wait_for_everyone()
    return results


def _checkpoint_files(checkpoint: Checkpoint) -> dict[str, Path]:
    prefix = f"{CHECKPOINTS_DIR}/{checkpoint.path.name}"
    return {f"{prefix}/{path.name}": path for path in sorted(checkpoint.path.iterdir()) if path.is_file()}
