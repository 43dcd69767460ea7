"""Victims: timm models trained with transformers ``Trainer`` on (protected) data, evaluated clean.

The model is a stock ``TimmWrapperForImageClassification`` (so the pushed repo loads with
``AutoModelForImageClassification`` + ``AutoImageProcessor``). From scratch, normalization is the image
processor's job, done here by the collator on whole batches; spatial augmentation commutes with
per-channel normalization, so it runs on normalized batches inside ``compute_loss``. A pretrained
backbone gets timm's own transforms for its weights instead (``data.timm_transforms``), image by image. Defenses
(``--defense``, sep_hf/defenses/) hook in at four points: the uint8 training images before
training (JPEG, grayscale), each augmented training batch (PGD, in pixels through
``VictimTrainer.to_pixels`` / ``to_normalized``), the model (RSE noise) and evaluation logits
(RSE's ensemble). The evaluation split is never transformed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import ImageClassifierOutput

from sep_hf.data.timm_transforms import timm_preprocessing
from sep_hf.data.view import TrainingData
from sep_hf.defenses import get_defense, list_defenses
from sep_hf.defenses.base import Defense
from sep_hf.models import check_model_name, load_pretrained_backbone, timm_model_args
from sep_hf.source.augment import augment_crop_flip, channel_stats
from sep_hf.source.recipe import TrainingRecipe, parameter_groups
from sep_hf.source.train import epoch_batch_size
from sep_hf.utils.io import atomic_folder
from sep_hf.utils.logging import get_logger

__all__ = [
    "VictimTrainingConfig",
    "TensorImageDataset",
    "VictimCollator",
    "VictimTrainer",
    "build_victim_model",
    "freeze_backbone",
    "accuracy_by_class",
    "train_victim",
    "ACCURACY_METRIC",
]

logger = get_logger(__name__)

ACCURACY_METRIC = str(Path(__file__).parent / "metrics" / "accuracy.py")


@dataclass
class TrainerArguments:
    """``transformers.TrainingArguments`` options a victim run passes through unchanged (same names, same meaning).

    The rest of TrainingArguments is set by the victim recipe (epochs, global batch, schedule, precision)
    or fixed by the protocol (evaluation every epoch on the clean split, no Trainer checkpoints).
    """

    report_to: str = field(default="none", metadata={"help": "Trainer: where to log metrics (none | all | tensorboard | wandb | trackio | ...)."})
    run_name: str | None = field(default=None, metadata={"help": "Trainer: the run's name in the logging integrations."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Trainer: worker processes loading batches (0: in the training process)."})
    torch_compile: bool = field(default=False, metadata={"help": "Trainer: compile the model with torch.compile."})


@dataclass
class VictimTrainingConfig(TrainingRecipe):
    """The appropriator's training: the source recipe by default, plus a defense (sep_hf/defenses/).

    The defense's own flags live beside it (``sep_hf/defenses/<name>.py``), prefixed with its name.
    """

    linear_probe: bool = field(default=False, metadata={"help": "Linear probe: the pretrained backbone frozen (eval mode), only the new classifier trained."})
    defense: str = field(default="none", metadata={"help": f"Training-time defense of the victim: {' | '.join(list_defenses())}."})

    def __post_init__(self):
        super().__post_init__()
        get_defense(self.defense)  # raises, listing the registered defenses

    def weights_name(self) -> str | None:
        """What ``timm.create_model(pretrained=True)`` loads (``models.pretrained_weights_name``); None: from scratch.

        Raises ValueError for --linear_probe without pretrained weights (a probe of random features).
        """
        name = super().weights_name()
        if self.linear_probe and name is None:
            raise ValueError(f"--linear_probe fits a classifier on a pretrained backbone, but --model {self.model} is "
                             "trained from scratch: pass --pretrained (a timm tag such as resnet18.a1_in1k), "
                             "--model hf-hub:org/name or a local folder.")
        return name

    @property
    def training_mode(self) -> str:
        """'scratch', 'pretrained-ft' (full fine-tuning) or 'linear-probe': the matrix column names."""
        if self.linear_probe:
            return "linear-probe"
        return "pretrained-ft" if self.pretrained else "scratch"


class TensorImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) and labels in memory: indexing is a tensor view, not a decode.

    With ``transform`` (timm's, ``data.timm_transforms``) each image is returned transformed and normalized
    as ``pixel_values``; without, as the uint8 ``image`` the collator normalizes batch-wise.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        if self.transform is not None:
            return {"pixel_values": self.transform(self.images[index]), "label": self.labels[index]}
        return {"image": self.images[index], "label": self.labels[index]}


class VictimCollator:
    """Stacks a batch and normalizes it (the image processor's step, unless the dataset's transform did): pixel_values, labels."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, examples: list[dict]) -> dict:
        labels = torch.stack([example["label"] for example in examples])
        if "pixel_values" in examples[0]:
            return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]), "labels": labels}
        images = torch.stack([example["image"] for example in examples]).float().div_(255.0)
        return {"pixel_values": (images - self.mean) / self.std, "labels": labels}


class VictimTrainer(Trainer):
    """``Trainer`` with batched augmentation, label smoothing and the defense's hooks in ``compute_loss``.

    ``augment=False``: the batches arrive augmented (timm's transforms); only the defense transforms them.
    """

    def __init__(self, *args, recipe: TrainingRecipe, mean, std, defense: Defense | None = None, augment: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe, self.augment = recipe, augment
        self.defense = defense or Defense()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self._generator = torch.Generator().manual_seed(recipe.seed)

    def get_train_dataloader(self):
        # Drop the last partial batch in training only (as the source loop does); never in evaluation, and
        # never when the training split is shorter than one batch: that batch is the epoch.
        self.args.dataloader_drop_last = len(self.train_dataset) >= self.recipe.batch_size
        try:
            return super().get_train_dataloader()
        finally:
            self.args.dataloader_drop_last = False

    def to_pixels(self, normalized: torch.Tensor) -> torch.Tensor:
        return normalized * self.std.to(normalized.device) + self.mean.to(normalized.device)

    def to_normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    def training_batch(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented, then defense-transformed (PGD, mixup, ...) normalized inputs and their targets."""
        augmented = pixel_values
        if self.augment:
            augmented = augment_crop_flip(pixel_values, self.recipe.crop_padding, self.recipe.flip, self._generator)
        return self.defense.training_batch(self, augmented, labels)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if model.training:
            pixel_values, labels = self.training_batch(pixel_values, labels)
            outputs = model(pixel_values=pixel_values.contiguous(memory_format=torch.channels_last))
        else:  # the defense's prediction (RSE: its ensemble); evaluation images are never transformed
            outputs = ImageClassifierOutput(logits=self.defense.eval_logits(
                model, pixel_values.contiguous(memory_format=torch.channels_last)))
        # labels may be soft targets (N, C) after mixup / cutmix: cross_entropy takes both
        loss = F.cross_entropy(outputs.logits.float(), labels,
                               label_smoothing=self.recipe.label_smoothing if model.training else 0.0)
        return (loss, outputs) if return_outputs else loss


def save_victim_model(trainer: Trainer, model_dir: Path) -> None:
    """``trainer.save_model`` into a staging folder the main process renames into ``model_dir`` (``io.atomic_folder``):
    a full disk leaves the previous folder or none, never half a model. Every process calls ``save_model`` (FSDP and
    DeepSpeed gather the weights on all of them); only the main one writes."""
    if not trainer.is_world_process_zero():
        trainer.save_model(str(model_dir.with_name(f".{model_dir.name}.partial")))
        return
    with atomic_folder(model_dir) as staging:
        trainer.save_model(str(staging))


class _EpochAccuracy(TrainerCallback):
    """Keeps (epoch, accuracy) after every evaluation for the card's curve."""

    def __init__(self):
        self.history: list[dict] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_accuracy" in metrics:
            self.history.append({"epoch": round(state.epoch or 0), "eval_accuracy": metrics["eval_accuracy"],
                                 "eval_loss": metrics.get("eval_loss")})


def build_victim_model(config: VictimTrainingConfig, class_names, img_size=None, in_chans: int = 3):
    """A ``TimmWrapperForImageClassification`` for the dataset's classes.

    From scratch: PyTorch-default initialized; ``in_chans=1`` (a grayscale dataset) gives a one-channel
    stem, saved in ``model_args`` so the pushed model reloads as such. Pretrained
    (``config.weights_name()``): timm's loader (``models.load_pretrained_backbone``) with a new
    classifier for ``class_names`` (zero-initialized); it keeps its RGB stem, grey images reach it as grey
    on R, G and B (timm's transforms convert them to RGB), and fixed-size models (ViTs) are
    rebuilt at ``img_size`` when given (timm resamples their position embeddings).
    """


    labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}
    weights = config.weights_name()
    if weights is not None:
        backbone = load_pretrained_backbone(weights, len(class_names))
        # timm's saved reconstruction arguments (in_chans, img_size, ...); the class count is the dataset's
        model_args = {k: v for k, v in (getattr(backbone, "pretrained_model_args", None) or {}).items() if k != "num_classes"}
        if (img_size is not None and backbone.pretrained_cfg.get("fixed_input_size")
                and tuple(backbone.pretrained_cfg["input_size"][1:]) != tuple(img_size)):
            model_args["img_size"] = tuple(img_size)
            backbone = load_pretrained_backbone(weights, len(class_names), img_size=tuple(img_size))
        timm_config = TimmWrapperConfig(architecture=backbone.pretrained_cfg["architecture"], num_labels=len(class_names),
                                        model_args=model_args or None, **labels)
        model = TimmWrapperForImageClassification(timm_config)
        model.timm_model.load_state_dict(backbone.state_dict())  # the pretrained weights and timm's new head
        model.timm_model.pretrained_cfg = backbone.pretrained_cfg
        if config.linear_probe:
            freeze_backbone(model)
        return model
    check_model_name(config.model.split(".")[0])  # transformers would blame the timm version instead
    model_args = timm_model_args(config.model.split(".")[0], img_size)
    if in_chans != 3:
        model_args = {**model_args, "in_chans": in_chans}
    timm_config = TimmWrapperConfig(architecture=config.model.split(".")[0], num_labels=len(class_names),
                                    model_args=model_args or None, **labels)
    model = TimmWrapperForImageClassification(timm_config)
    # transformers re-initializes every layer with N(0, 0.02); train from PyTorch's defaults as the
    # source model does, so clean victims and source share one recipe.
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    return model


def classifier_parameters(model) -> list[torch.nn.Parameter]:
    """The classifier's parameters (timm's ``get_classifier()``) of a ``TimmWrapperForImageClassification``."""
    return list(model.timm_model.get_classifier().parameters())


def freeze_backbone(model) -> None:
    """Linear probe: every parameter but the classifier's frozen, and the backbone kept in eval mode
    (BatchNorm statistics and dropout as pretrained) whenever ``Trainer`` calls ``model.train()``."""
    head = {id(p) for p in classifier_parameters(model)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in head)
    timm_model = model.timm_model

    def train(mode: bool = True):
        torch.nn.Module.train(timm_model, False)
        timm_model.get_classifier().train(mode)
        return timm_model

    timm_model.train = train
    timm_model.eval()


def accuracy_by_class(predictions, labels, class_names, pretrained_label_names=None) -> dict:
    """Per-class accuracy of the final evaluation and, for a backbone whose ``pretrained_cfg`` names its
    classes (``label_names``), the accuracy on images of the classes it was pretrained on ("seen") and
    on the others ("unseen"): whether a protection holds where the backbone already knows the class.

    ``predictions``, ``labels``: class indices (N,). Returns ``eval_accuracy_per_class`` (name -> accuracy,
    None for a class without evaluation images) and, with label names, ``pretraining_seen_classes``,
    ``eval_accuracy_seen_classes`` and ``eval_accuracy_unseen_classes`` (None where no image is of such a class).
    """

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    correct = predictions == labels
    per_class = {name: (float(correct[labels == index].mean()) if (labels == index).any() else None)
                 for index, name in enumerate(class_names)}
    out = {"eval_accuracy_per_class": per_class}
    if pretrained_label_names:
        names = set(pretrained_label_names.values() if isinstance(pretrained_label_names, dict) else pretrained_label_names)
        seen = [index for index, name in enumerate(class_names) if name in names]
        is_seen = np.isin(labels, seen)
        out.update(pretraining_seen_classes=[class_names[i] for i in seen],
                   eval_accuracy_seen_classes=float(correct[is_seen].mean()) if is_seen.any() else None,
                   eval_accuracy_unseen_classes=float(correct[~is_seen].mean()) if (~is_seen).any() else None)
    return out


def _accuracy_metric():
    """The shipped ``evaluate`` accuracy module; where ``evaluate`` is not installed (a bare GPU machine:
    bench/paper_scale.py) the same mean of correct predictions, computed with numpy."""
    try:
        import evaluate
    except ImportError:
        return SimpleNamespace(compute=lambda predictions, references: {
            "accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))})
    return evaluate.load(ACCURACY_METRIC)


def _processor_config(mean, std, img_size, data_config: dict | None = None) -> dict:
    """timm ``pretrained_cfg`` saved in config.json: what ``AutoImageProcessor`` preprocesses with (a pretrained
    victim: timm's evaluation transform, ``data_config``; from scratch: the data's size, no crop)."""
    if data_config is not None:
        return {**data_config, "input_size": tuple(data_config["input_size"]), "mean": tuple(data_config["mean"]),
                "std": tuple(data_config["std"])}
    return {"input_size": (len(mean), *img_size), "mean": tuple(mean), "std": tuple(std), "crop_pct": 1.0,
            "crop_mode": "center", "interpolation": "bicubic"}


def train_victim(config: VictimTrainingConfig, data: TrainingData, output_dir: str | Path, defense: Defense | None = None,
                 mixed_precision: str = "no", gradient_accumulation_steps: int = 1,
                 trainer_args: TrainerArguments | None = None, input_size=None) -> dict:
    """Train a victim on ``data.train_*`` and evaluate on the clean ``data.eval_*`` every epoch.

    From scratch the model sees the data's size; a pretrained backbone sees ``input_size`` ((H, W); None:
    its weights' size) through timm's transforms for its weights (``data.timm_transforms``).

    ``defense`` (``sep_hf.defenses.build_defense``) must be the one ``config.defense`` names.
    ``config.batch_size`` is the global batch of one optimizer step, as for the source: each of the
    N processes (accelerate's ``PartialState``) gets ``batch_size / (N x gradient_accumulation_steps)``
    images per micro-batch, so the learning-rate schedule, sized in optimizer steps of the global
    batch, runs to its end whatever N is. Raises ValueError if that does not divide evenly. Fewer
    training images than ``batch_size``: one smaller batch per epoch (``source.train.epoch_batch_size``).
    """
    output_dir = Path(output_dir)
    # TrainingArguments sets up the distributed state (a PartialState made earlier may still say 1 process)
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        per_device_eval_batch_size=500,
        eval_strategy="epoch", save_strategy="no", logging_strategy="epoch",
        seed=config.seed, bf16=mixed_precision == "bf16", fp16=mixed_precision == "fp16",
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, disable_tqdm=False,
        **asdict(trainer_args or TrainerArguments()),
    )
    world = args.world_size
    if config.batch_size % (world * gradient_accumulation_steps):
        raise ValueError(f"--batch_size {config.batch_size} must be divisible by processes x gradient accumulation "
                         f"({world} x {gradient_accumulation_steps}).")
    num_train, parts = len(data.train_labels), world * gradient_accumulation_steps
    batch_size = epoch_batch_size(config.batch_size, num_train, parts)  # a short dataset: one smaller batch
    micro_batch = args.per_device_train_batch_size = -(-batch_size // parts)  # ceil: every image of a short batch
    torch.manual_seed(config.seed)
    defense = defense or Defense()
    if defense.name != config.defense:
        raise ValueError(f"config.defense is '{config.defense}' but the defense passed is '{defense.name}'.")
    if not isinstance(data.train_images, torch.Tensor) and config.defense != "none":
        raise ValueError(f"--defense {config.defense} transforms the whole training split in memory: raise "
                         f"--keep_in_memory_mb above its decoded size ({len(data.train_labels)} images at "
                         f"{data.train_images.shape[2]}x{data.train_images.shape[3]}).")
    start = time.perf_counter()
    train_images = defense.prepare_training_images(data.train_images)  # once, training split only
    prepare_seconds = time.perf_counter() - start
    preprocessing = None
    if config.pretrained:
        input_size = tuple(input_size) if input_size is not None else None
        model = build_victim_model(config, data.class_names, input_size)
        pretrained_cfg = dict(model.timm_model.pretrained_cfg)
        preprocessing = timm_preprocessing(model.timm_model, input_size)
        img_size = preprocessing.input_size
        mean, std = list(preprocessing.data_config["mean"]), list(preprocessing.data_config["std"])
    else:
        img_size = tuple(data.train_images.shape[2:])
        model = build_victim_model(config, data.class_names, img_size, in_chans=data.train_images.shape[1])
        pretrained_cfg = {}
        # Statistics of the data as published, not as the defense transformed it: the image
        # processor normalizes real (colour, uncompressed) images with them at inference.
        mean, std = channel_stats(data.train_images)
    model.config.pretrained_cfg = _processor_config(mean, std, img_size, preprocessing and preprocessing.data_config)
    groups = parameter_groups(model.timm_model, config, linear_probe=config.linear_probe)
    model = defense.wrap_model(model.to(memory_format=torch.channels_last))

    steps_per_epoch = num_train // batch_size
    optimizer, scheduler = config.optimizer_and_schedule(groups, steps_per_epoch)
    metric = _accuracy_metric()

    last = {}

    def compute_metrics(prediction):
        last["predictions"], last["labels"] = prediction.predictions.argmax(-1), prediction.label_ids
        return metric.compute(predictions=last["predictions"], references=last["labels"])

    history = _EpochAccuracy()
    trainer = VictimTrainer(
        model=model, args=args,
        train_dataset=TensorImageDataset(train_images, data.train_labels, preprocessing and preprocessing.train),
        eval_dataset=TensorImageDataset(data.eval_images, data.eval_labels, preprocessing and preprocessing.eval),
        data_collator=VictimCollator(mean, std), compute_metrics=compute_metrics, optimizers=(optimizer, scheduler),
        callbacks=[history], recipe=config, mean=mean, std=std, defense=defense, augment=preprocessing is None,
    )
    train_output = trainer.train()
    final = history.history[-1]  # the evaluation after the last epoch is the final model's
    save_victim_model(trainer, output_dir / "model")
    return {
        "eval_accuracy": final["eval_accuracy"],
        **accuracy_by_class(last["predictions"], last["labels"], data.class_names, pretrained_cfg.get("label_names")),
        "training_mode": config.training_mode,
        "input_size": list(img_size),
        "preprocessing": ({"transforms": "timm", **preprocessing.data_config} if preprocessing else
                          {"transforms": "sep-hf crop and flip", "crop_padding": config.crop_padding, "flip": config.flip}),
        "eval_loss": final["eval_loss"],
        "history": history.history,
        "train_seconds": train_output.metrics["train_runtime"],
        "optimizer_steps": train_output.global_step,
        "micro_batch_size": micro_batch, "num_processes": world, "gradient_accumulation_steps": gradient_accumulation_steps,
        "trainer_arguments": asdict(trainer_args or TrainerArguments()),
        "planned_optimizer_steps": steps_per_epoch * config.epochs,
        "train_samples_per_second": train_output.metrics["train_samples_per_second"],
        "num_train": len(data.train_labels),
        "num_eval": len(data.eval_labels),
        "training_config": asdict(config),
        "normalization": {"mean": mean, "std": std},
        "defense": config.defense,
        "defense_settings": defense.describe(),
        "defense_arguments": asdict(defense.settings) if defense.settings is not None else {},
        "defense_prepare_seconds": prepare_seconds,
    }
