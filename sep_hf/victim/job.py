"""The victim job: an appropriator's model trained with Trainer on (protected) data, reported on its card.

``recipes/train_victim.py`` parses flags and calls ``run_victim``. The victim is evaluated on the
clean test split; its card's model-index holds the accuracy, and ``--update_dataset_card`` adds it
to the protected dataset's victim table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import PartialState
from huggingface_hub import DatasetCard

from sep_hf.arguments import CARD_FILE, CURVE_FILE, RESULTS_FILE, HubArguments, RunArguments, check_pretrained
from sep_hf.data.load import public_name, resolve_dataset_name
from sep_hf.data.view import DataArguments, load_training_data
from sep_hf.defenses import build_defense
from sep_hf.models import hub_model_id, public_model_name
from sep_hf.publish import hub
from sep_hf.publish.cards import accuracy_curve_png, add_victim_to_dataset_card, victim_model_card
from sep_hf.utils.io import check_writable, write_json
from sep_hf.utils.presets import apply_preset
from sep_hf.utils.runtime import resolve_mixed_precision
from sep_hf.victim.trainer import TrainerArguments, train_victim

__all__ = ["VictimArguments", "run_victim", "mix_clean_rows"]


@dataclass
class VictimArguments:
    """The victim run's reporting and partial-protection flags (not hyperparameters: those are the recipe's)."""

    update_dataset_card: bool = field(default=False, metadata={"help": "Add this victim's accuracy to --dataset's card."})
    clean_reference_accuracy: float | None = field(default=None, metadata={"help": "Accuracy of the same recipe on clean data, for the card."})
    clean_dataset: str | None = field(default=None, metadata={"help": "Partial protection: the clean originals of --dataset (same rows and classes) to mix in."})
    clean_fraction: float = field(default=0.0, metadata={"help": "Partial protection: share of the training rows taken from --clean_dataset (0.5: half protected; 0.2: 80%% protected)."})

    def __post_init__(self):
        if not 0 <= self.clean_fraction <= 1:
            raise ValueError(f"--clean_fraction is a share in [0, 1], got {self.clean_fraction}.")
        if self.clean_fraction > 0 and not self.clean_dataset:
            raise ValueError("--clean_fraction needs --clean_dataset (the clean originals to mix in).")


def mix_clean_rows(data, clean, fraction: float, seed: int = 0):
    """Replace a seeded ``fraction`` of the training rows by the same rows of the clean originals.

    The appropriator's partial-protection case: only some images of the collection are protected.
    Rows, not new images, are swapped, so the training set keeps its size and class balance.
    """

    if clean.class_names != data.class_names or len(clean.train_labels) < len(data.train_labels):
        raise ValueError(f"--clean_dataset must hold the originals of --dataset: {len(clean.class_names)} classes and "
                         f"{len(clean.train_labels)} rows against {len(data.class_names)} and {len(data.train_labels)}.")
    count = round(len(data.train_labels) * fraction)
    rows = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(seed))[:count]
    if not torch.equal(clean.train_labels[rows], data.train_labels[rows]):
        raise ValueError("--clean_dataset's labels differ from --dataset's on the same rows: not its originals.")
    images = data.train_images.clone()
    images[rows] = clean.train_images[rows]
    return replace(data, train_images=images)


def _dataset_card_row(results: dict) -> dict:
    return {key: results.get(key) for key in ("model", "training_mode", "defense", "defense_settings", "num_train", "eval_accuracy",
                                              "hub_model_id", "eval_dataset", "clean_reference_accuracy",
                                              "clean_fraction")}


def _hub_dataset(dataset: str) -> str | None:
    """The Hub repo of ``--dataset``; None for a local folder."""
    dataset_id = resolve_dataset_name(dataset)
    return None if Path(dataset_id).is_dir() else dataset_id


def _check_write_access(hub_args: HubArguments, victim_args: VictimArguments, dataset: str) -> None:
    """Before any compute: a token that cannot write the victim repo or the dataset card fails now, not after training."""
    if hub_args.push_to_hub:
        hub.check_write_access(hub_args.hub_model_id, "model")
    card_repo = _hub_dataset(dataset) if victim_args.update_dataset_card else None
    if card_repo is not None:
        hub.check_write_access(card_repo, "dataset")


def _update_dataset_card(dataset: str, row: dict) -> None:
    dataset_id = _hub_dataset(dataset)
    if dataset_id is None:
        local = Path(resolve_dataset_name(dataset))
        card = add_victim_to_dataset_card(DatasetCard.load(local / CARD_FILE), row)
        card.save(local / CARD_FILE)
    else:
        card = add_victim_to_dataset_card(hub.load_card(dataset_id, "dataset"), row)
        hub.push_card(card, dataset_id, "dataset", f"Add victim {row['model']} ({row['defense']}): {row['eval_accuracy']:.4f}")


def run_victim(config, data_args: DataArguments, run_args: RunArguments, hub_args: HubArguments,
               victim_args: VictimArguments, defense_args: list | tuple = (),
               trainer_args: TrainerArguments | None = None) -> dict | None:
    """Train a victim with Trainer, write its card and results.json, push, and fill the dataset card.

    ``defense_args`` are the parsed defense flag dataclasses (``sep_hf.defenses.defense_arguments``);
    ``trainer_args`` the TrainingArguments options passed through (``--report_to``, ``--dataloader_num_workers``, ...).
    """


    apply_preset(run_args.preset, config, data_args)
    defense = build_defense(config.defense, defense_args)  # before any compute: flags of other defenses fail here
    pretrained = check_pretrained(config, data_args)  # also refuses --linear_probe without pretrained weights
    base_model = (hub_model_id(config.model) or pretrained.get("hf_hub_id")) if pretrained else None
    state = PartialState()
    if state.is_main_process:
        _check_write_access(hub_args, victim_args, data_args.dataset)
    output_dir = check_writable(run_args.output_dir)  # before any compute: the model could not be saved otherwise
    with state.main_process_first():
        # a pretrained backbone resizes the images itself (timm's transforms, at --image_size or its weights' size)
        data = load_training_data(data_args, native_size=config.pretrained)
        if victim_args.clean_fraction > 0:
            clean = load_training_data(replace(data_args, dataset=victim_args.clean_dataset, eval_dataset=None),
                                       native_size=config.pretrained)
            data = mix_clean_rows(data, clean, victim_args.clean_fraction, config.seed)
    mixed_precision = resolve_mixed_precision(run_args.mixed_precision, use_cpu=not state.device.type == "cuda")
    results = train_victim(config, data, output_dir, defense, mixed_precision=mixed_precision,
                           gradient_accumulation_steps=run_args.gradient_accumulation_steps, trainer_args=trainer_args,
                           input_size=data_args.image_size)
    if not state.is_main_process:
        return None
    # Public names only: a local folder is named by its folder name, never by its path (cards are pushed).
    results.update(
        model=public_model_name(config.model), base_model=base_model, defense=config.defense, dataset=public_name(data.dataset_id),
        dataset_revision=data.dataset_revision, eval_dataset=public_name(data.eval_dataset_id or data.dataset_id),
        eval_dataset_revision=data.eval_dataset_revision if data.eval_dataset_id else data.dataset_revision,
        eval_split=data.eval_split, image_size=results["input_size"], preset=run_args.preset,
        clean_reference_accuracy=victim_args.clean_reference_accuracy,
        clean_dataset=public_name(resolve_dataset_name(victim_args.clean_dataset)) if victim_args.clean_fraction > 0 else None,
        clean_fraction=victim_args.clean_fraction,
        hub_model_id=hub_args.hub_model_id if hub_args.push_to_hub else None,
    )
    results["training_config"]["model"] = results["model"]  # a local backbone folder by its name only
    model_dir = output_dir / "model"
    (model_dir / "training_args.bin").unlink(missing_ok=True)  # Trainer's pickle holds local paths; not needed to load
    history = results["history"]
    (model_dir / CURVE_FILE).write_bytes(accuracy_curve_png(
        [row["epoch"] for row in history], [row["eval_accuracy"] for row in history],
        title=f"{results['model']} on {results['dataset'].split('/')[-1]} ({config.defense})"))
    victim_model_card(results["hub_model_id"], results, CURVE_FILE).save(model_dir / CARD_FILE)
    write_json(model_dir / RESULTS_FILE, results)
    write_json(output_dir / RESULTS_FILE, results)
    if hub_args.push_to_hub:
        # created only now, private until the upload landed; an existing repo keeps its visibility
        results["hub_revision"] = hub.publish_folder(
            hub_args.hub_model_id, model_dir, "model",
            f"Victim {results['model']} ({config.defense}): {results['eval_accuracy']:.4f}",
            new_repo_private=hub_args.hub_private_repo)
        write_json(output_dir / RESULTS_FILE, results)
    if victim_args.update_dataset_card:
        _update_dataset_card(data_args.dataset, _dataset_card_row(results))
    return results
