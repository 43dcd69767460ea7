"""Model and dataset cards and their figures. Every number a card states comes from a results dict.

Cards are rendered by ``huggingface_hub``'s ``ModelCard`` / ``DatasetCard.from_template`` from the
Jinja templates in ``templates/`` (the text), with metadata from ``ModelCardData`` / ``DatasetCardData``
(``model-index`` accuracy, ``base_model``, ``license``, tags); this module computes the values.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData
from matplotlib.figure import Figure
from PIL import Image
from torchvision.utils import make_grid

from sep_hf.data.images import quantize

TEMPLATES = Path(__file__).parent / "templates"  # Jinja card templates rendered by huggingface_hub

__all__ = ["accuracy_curve_png", "victim_model_card", "training_curve_png", "source_model_card", "sample_grid_png", "protected_dataset_card", "VICTIM_TABLE_START", "VICTIM_TABLE_END", "add_victim_to_dataset_card", "defense_label"]


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # a Figure without pyplot: no global state
    return buffer.getvalue()


def accuracy_curve_png(epochs: list[int], accuracy: list[float], loss: list[float] | None = None,
                       title: str = "", accuracy_label: str = "clean test accuracy", loss_label: str = "train loss") -> bytes:
    """Accuracy (left axis) and optionally a loss (right axis) per epoch."""
    fig = Figure(figsize=(6, 3.5))
    accuracy_axis = fig.subplots()
    accuracy_axis.plot(epochs, accuracy, "o-", color="tab:blue", ms=3)
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel(accuracy_label, color="tab:blue")
    accuracy_axis.set_ylim(0, 1)
    if loss is not None:
        loss_axis = accuracy_axis.twinx()
        loss_axis.plot(epochs, loss, "s--", color="tab:red", ms=3)
        loss_axis.set_ylabel(loss_label, color="tab:red")
    accuracy_axis.set_title(title)
    accuracy_axis.grid(alpha=0.3)
    return _figure_png(fig)


def training_curve_png(history: list[dict], title: str = "Source training") -> bytes:
    """Clean test accuracy and train loss per epoch of a source run."""
    return accuracy_curve_png([row["epoch"] for row in history], [row["clean_test_accuracy"] for row in history],
                              [row["train_loss"] for row in history], title)


def source_model_card(
    repo_id: str | None,
    model_config: dict,
    training_config: dict,
    dataset_id: str,
    dataset_revision: str | None,
    checkpoints: list[dict],
    history: list[dict],
    num_train: int,
    num_eval: int,
    curve_file: str = "training_curve.png",
):
    """Card for a source run: config, accuracy per checkpoint, curve, and how to load the ensemble."""

    name = repo_id or "sep-hf source run"
    final = history[-1] if history else None
    eval_results = []
    on_hub = dataset_revision is not None  # a local folder (named by its folder name only) has no revision
    if final is not None and on_hub:

        eval_results.append(EvalResult(
            task_type="image-classification", task_name="Image Classification", dataset_type=dataset_id,
            dataset_name=dataset_id, dataset_split="test", dataset_revision=dataset_revision,
            metric_type="accuracy", metric_value=round(final["clean_test_accuracy"], 4),
            metric_name=f"clean test accuracy (first {num_eval} test images)",
        ))
    data = ModelCardData(
        library_name="sep-hf", tags=["sep-hf", "self-ensemble-protection", "image-classification", "timm"],
        datasets=[dataset_id] if on_hub else None, metrics=["accuracy"],
        model_name=name.split("/")[-1], eval_results=eval_results or None, pipeline_tag="image-classification",
    )
    return ModelCard.from_template(
        data, template_path=TEMPLATES / "source_model_card.md", name=name, model_name=model_config["model_name"],
        num_train=num_train, num_eval=num_eval, dataset_id=dataset_id, checkpoints=checkpoints, curve_file=curve_file,
        revision=f" at revision `{dataset_revision}`" if dataset_revision else "", load_from=repo_id or "OUTPUT_DIR",
        config_json=json.dumps(training_config, indent=2, sort_keys=True), model_json=json.dumps(model_config, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# protected dataset card


VICTIM_TABLE_START = "<!-- sep-hf victim table start -->"
VICTIM_TABLE_END = "<!-- sep-hf victim table end -->"


def sample_grid_png(clean: torch.Tensor, protected: torch.Tensor, eps: float, scale: int = 4) -> bytes:
    """Rows: clean images, protected images, perturbation amplified to the full range (0.5 + delta / 2eps)."""


    amplified = (0.5 + (protected - clean) / (2 * eps)).clamp(0, 1)
    tiles = torch.cat([clean, protected, amplified]).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(tiles, nrow=len(clean), padding=2, pad_value=1.0)[:, 2:-2, 2:-2]  # no outer border
    buffer = io.BytesIO()
    Image.fromarray(quantize(grid).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def defense_label(defense: str | None, settings: dict | None = None) -> str:
    """``at (eps 4, steps 10, ...)``: the defense and its scalar settings (the card's one-line form)."""
    scalars = [f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
               for key, value in (settings or {}).items() if isinstance(value, (bool, int, float))]
    return f"{defense or 'none'} ({', '.join(scalars)})" if scalars else (defense or "none")


def _victim_table(rows: list[dict]) -> str:
    if not rows:
        body = "No victim has been trained on this dataset yet: run `recipes/train_victim.py --update_dataset_card`."
    else:
        lines = ["| victim model | defense | training images | clean test accuracy | model repo |", "|---|---|---:|---:|---|"]
        for row in rows:
            lines.append(f"| `{row['model']}` | {defense_label(row.get('defense'), row.get('defense_settings'))} | {row['num_train']} | "
                         f"{row['eval_accuracy']:.4f} | {row.get('hub_model_id') or '(local)'} |")
        body = "\n".join(lines)
    return f"{VICTIM_TABLE_START}\n{body}\n{VICTIM_TABLE_END}"


VICTIMS_KEY = "sep_hf_victims"


def add_victim_to_dataset_card(card, row: dict):
    """Record a victim in the card's YAML (``sep_hf_victims``) and redraw the table from it.

    A row for the same victim repo (or the same local model, defense and size) is replaced.
    """
    if VICTIM_TABLE_START not in card.text:
        raise ValueError("This dataset card has no sep-hf victim table; was the dataset published by sep-hf?")
    key = ("hub_model_id", "model", "defense", "defense_settings", "num_train") if not row.get("hub_model_id") else ("hub_model_id",)
    rows = [r for r in (card.data.get(VICTIMS_KEY) or []) if any(r.get(k) != row.get(k) for k in key)] + [row]
    card.data[VICTIMS_KEY] = rows
    start = card.text.index(VICTIM_TABLE_START)
    end = card.text.index(VICTIM_TABLE_END) + len(VICTIM_TABLE_END)
    card.text = card.text[:start] + _victim_table(rows) + card.text[end:]
    return card


MEASURED_MATRIX = Path(__file__).parent / "measured" / "protection_matrix_cpu.json"


def measured_matrix_section(method: str, eps: int | None, preset: str, path: Path = MEASURED_MATRIX) -> str:
    """The method's row of the protection matrix when one was measured at this scale (bench/protection_matrix.py)."""
    measured = json.loads(path.read_text()) if path.exists() else {}
    row = measured.get("rows", {}).get(method)
    if preset != "cpu" or row is None or row.get("eps") != eps:
        return ("No protection matrix has been measured for this method at this scale: how much an appropriator's "
                "training (JPEG recompression, adversarial training, noise, an ImageNet backbone probed or fine-tuned, "
                "...) recovers is unknown here.")
    clean = measured.get("clean", {})
    lines = ["| training | victim accuracy on protected data | same training on clean data |", "|---|---:|---:|"]
    lines += [f"| {COLUMN_LABELS.get(column, column)} | {accuracy:.4f} | " + (f"{clean[column]:.4f} |" if column in clean else "- |")
              for column, accuracy in row["cells"].items()]
    defeated = ", ".join(f"`{name}`" for name in row.get("defeated_by", [])) or "none of the measured trainings"
    missing = (f" Not measured: {', '.join(row['missing_defenses'])}, so the floor is a lower bound: an unmeasured "
               "training may reach more." if row.get("missing_defenses") else "")
    return (f"Measured at the **{measured['scale']}** (on {', '.join(measured.get('machines', []))}), not at "
            f"this dataset's scale.\n\n" + "\n".join(lines) + "\n\n"
            f"**Protection floor** (the best accuracy an appropriator reaches over these trainings): "
            f"**{row['floor']:.4f}** with `{row['floor_defense']}`. Trainings that undo most of the protection "
            f"(at least {measured.get('defeat_share', 0.8):.0%} of the clean-data accuracy): {defeated}.{missing}"
            + _pretrained_sentence(row, clean)
            + ("" if any(c in row["cells"] for c in PRETRAINED_COLUMNS) else real_appropriator_sentence(method)))


PRETRAINED_COLUMNS = {"pretrained-ft": "fine-tuning a pretrained backbone", "linear-probe": "a linear probe of a frozen pretrained backbone"}
# The matrix's columns a reader could mistake: the real ImageNet backbone and the bench's stand-in
COLUMN_LABELS = {"pretrained-ft": "pretrained-ft (ImageNet EfficientNet-Lite2 fine-tuned)",
                 "linear-probe": "linear-probe (ImageNet EfficientNet-Lite2 probed)",
                 "standin-ft": "standin-ft (stand-in: a small CIFAR-pretrained net fine-tuned)",
                 "standin-probe": "standin-probe (stand-in: a small CIFAR-pretrained net probed)"}
STANDIN_COLUMNS = {"standin-ft": "fine-tuning it", "standin-probe": "a linear probe of it"}


def _pretrained_sentence(row: dict, clean: dict) -> str:
    """What the pretrained appropriators reach, said plainly: the real ImageNet backbone (``pretrained-ft``,
    ``linear-probe``) with a verdict, the stand-in (``standin-ft``, ``standin-probe``) labelled as one."""
    sentences = []
    for columns, who in ((PRETRAINED_COLUMNS, "The real pretrained appropriator (an ImageNet EfficientNet-Lite2)"),
                         (STANDIN_COLUMNS, "A stand-in pretrained appropriator (a small net the bench pretrained on "
                                           "other CIFAR-10 images, not an ImageNet backbone)")):
        measured = [c for c in columns if c in row["cells"]]
        if not measured:
            continue
        reached = "; ".join(f"{columns[c]} reaches {row['cells'][c]:.4f}"
                            + (f" ({clean[c]:.4f} on clean data: {row['cells'][c] / clean[c]:.0%} of it kept)"
                               if clean.get(c) else "") for c in measured)
        defeated = [c for c in measured if c in row.get("defeated_by", [])]
        verdict = " **This protection does not hold against it.**" if defeated else ""
        sentences.append(f"\n\n{who}: {reached}.{verdict}")
    return "".join(sentences)


MEASURED_REAL_APPROPRIATOR = Path(__file__).parent / "measured" / "real_appropriator_cpu.json"


def real_appropriator_sentence(method: str, path: Path = MEASURED_REAL_APPROPRIATOR) -> str:
    """What an ImageNet backbone probed or fine-tuned reached on the bench's data protected by ``method``
    (bench/real_appropriator.py --release), or that it was not measured: never silence."""
    measured = json.loads(path.read_text()) if path.exists() else {}
    backbone = measured.get("backbone", "timm/tf_efficientnet_lite2.in1k")
    cells, clean = measured.get("rows", {}).get(method), measured.get("rows", {}).get("clean", {})
    if not cells:
        return (f"\n\nThe real appropriator, an ImageNet backbone (`{backbone}`) probed or fine-tuned, has not been "
                "measured against this method: expect it to recover more than training from scratch.")
    reached = "; ".join(f"{PRETRAINED_COLUMNS[column]} reaches {accuracy:.4f}"
                        + (f" ({clean[column]:.4f} on clean data)" if column in clean else "")
                        for column, accuracy in cells.items())
    return (f"\n\nThe real appropriator, an ImageNet backbone (`{backbone}`, {measured['protocol']}; "
            f"{', '.join(measured['machines'])}): {reached}.")


PROTECTION_BEGIN = "<!-- sep-hf protection: begin -->"
PROTECTION_END = "<!-- sep-hf protection: end -->"
_MERGED_LISTS = ("tags", "task_categories", "source_datasets")


def keep_owner_card(owner_card, data, body: str):
    """(card data, body) of a repo protected in place: the owner's text and metadata (license, citation,
    pretty name, ...) are kept; sep-hf's tags are added to theirs, its ``configs`` / ``dataset_info``
    describe the new files, and its section (between ``PROTECTION_BEGIN`` and ``PROTECTION_END``)
    replaces the one of an earlier protection or is appended."""

    merged = owner_card.data.to_dict()
    for key, value in data.to_dict().items():
        if key in _MERGED_LISTS and merged.get(key):
            merged[key] = list(dict.fromkeys([*merged[key], *(value or [])]))
        elif key not in merged or merged[key] is None or key in ("configs", "dataset_info"):
            merged[key] = value
    text = owner_card.text
    if PROTECTION_BEGIN in text and PROTECTION_END in text:
        head, rest = text.split(PROTECTION_BEGIN, 1)
        text = head.rstrip() + "\n\n" + body.strip() + "\n" + rest.split(PROTECTION_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + body.strip() + "\n"
    return DatasetCardData(**merged), text


def _schema_sentence(class_encoded: dict | None, shown: int = 10) -> str:
    """What the card says of the columns: the source's, and how class names (strings) became a ClassLabel."""
    if not class_encoded:
        return "Same columns and labels as the source."
    names = class_encoded["names"]
    listed = ", ".join(f"{index} = {name}" for index, name in enumerate(names[:shown])) + (", ..." if len(names) > shown else "")
    return (f"Same columns as the source; its class names in `{class_encoded['column']}` are stored as a ClassLabel, "
            f"class-encoded as `datasets`' `class_encode_column` does (names sorted: {listed}).")


def audit_section(audit: dict | None) -> str:
    """The protect run's own audit (``victim.audit``): a linear probe on a public ImageNet backbone, trained on
    this dataset's protected images and on their clean originals, or why it was not run."""
    if not audit:
        return "Not audited: this protection was made before sep-hf audited its runs."
    if not audit.get("audited"):
        return f"Not audited: {audit['reason']}."
    kept = audit["protected_accuracy"] / audit["clean_accuracy"] if audit["clean_accuracy"] else float("nan")
    size = "x".join(map(str, audit["input_size"]))
    return (f"A linear probe on the features of `{audit['model']}` ({size} px; {audit['probe']}), trained on the "
            f"{audit['num_train']} protected training images, reaches **{audit['protected_accuracy']:.4f}** on the "
            f"{audit['num_eval']} clean `{audit['eval_split']}` images; the same probe trained on the clean originals "
            f"reaches **{audit['clean_accuracy']:.4f}** (the protected data keeps {kept:.0%} of it). "
            f"{audit['precision']}, {audit['seconds_per_1000_images']:.1f} s per 1,000 images.")


def protected_dataset_card(results: dict, method_lines: list[str], grid_file: str):
    """Card data and body of a protected dataset; figures come from ``results`` (results.json) and the
    method's own lines (``ProtectionTransform.card_lines``)."""

    source_dataset, source_revision = results["dataset"], results.get("dataset_revision")
    data = DatasetCardData(
        task_categories=["image-classification"], tags=["sep-hf", "unlearnable-examples", "data-protection",
                                                        results["method"]],
        source_datasets=[source_dataset] if source_revision else None,  # a local folder is no Hub dataset
        pretty_name=f"{source_dataset.split('/')[-1]} protected with {results['method'].upper()}",
        license=results.get("license") or "unknown",
    )
    revision = f" (revision `{source_revision}`)" if source_revision else ""
    protected = ", ".join(f"`{name}`" for name in results.get("protected_splits", results["splits"]))
    paper = results.get("paper") or {}
    reference = f" ([{paper['title']}]({paper['url']}), {paper['authors']})" if paper else ""
    eps, largest = results.get("eps"), results.get("max_linf")
    if eps is None:
        bound = "the perturbation is not norm-bounded (see max L-inf below)"
    elif largest is None or largest <= eps:
        bound = f"every pixel satisfies |x' - x| <= {eps}/255"
    else:  # sep-robust's grating and pixel shortcuts are added beyond the budget, by design
        bound = (f"the crafted perturbation is within {eps}/255; the components beyond the budget listed above bring "
                 f"the largest change to {largest}/255")
    pixel_line = "- pixels stored as lossless PNG, rounded to uint8; " + bound
    if results.get("resolution"):
        pixel_line += (f"\n- resolution: {results['resolution']}; |x' - x| is measured against every pixel of the source "
                       "as `load_dataset` decodes it (EXIF orientation applied, 16-bit and float images scaled to 8 bits)")
    size = results.get("size")
    if size:
        pixel_line += (f"\n- size: {size['published_bytes'] / 1e6:.1f} MB published for {size['source_bytes'] / 1e6:.1f} MB of "
                       f"source images ({size['ratio']:.1f}x): {size['format']} keeps every perturbed pixel exactly")
    mode = results.get("image_mode")
    if mode and mode != "RGB":  # RGB cards read as they always did
        pixel_line += (f"\n- images keep the source's mode `{mode}`: "
                       + ("one grey channel carries the perturbation" if mode.startswith("L") else "RGB carries the perturbation")
                       + ("; the alpha channel is copied unchanged" if mode.endswith("A") else ""))
    license_note = {"source": " (the source dataset's)", "flag": ""}.get(results.get("license_from"),
                                                                       ": the source states none; pass --license")
    card = DatasetCard.from_template(
        data, template_path=TEMPLATES / "protected_dataset_card.md", protection_begin=PROTECTION_BEGIN,
        protection_end=PROTECTION_END, source_dataset=source_dataset, revision=revision, method=results["method"],
        schema_sentence=_schema_sentence(results.get("class_encoded")),
        reference=reference, mean_psnr=results["mean_psnr"], method_text="\n".join(method_lines), protected=protected,
        pixel_line=pixel_line, license=data.license, license_note=license_note, splits=results["splits"],
        grid_file=grid_file, victim_table=_victim_table(results.get("victims", [])),
        measured_section=measured_matrix_section(results["method"], results.get("eps"), results.get("preset", "")),
        audit_section=audit_section(results.get("audit")),
        config_json=json.dumps(results["config"], indent=2, sort_keys=True))
    return data, "\n" + card.text.strip() + "\n"


# ----------------------------------------------------------------------------------------------
# victim model card


TRAINING_MODES = {"scratch": "trained from scratch",
                  "pretrained-ft": "pretrained backbone fine-tuned (backbone at {scale:g} x the learning rate)",
                  "linear-probe": "linear probe (pretrained backbone frozen, new classifier trained)"}


def _pretraining_lines(results: dict) -> str:
    """How the victim started (scratch, fine-tuned, linear probe) and its accuracy on classes seen / unseen in pretraining."""
    mode = results.get("training_mode", "scratch")
    if mode == "scratch":
        return ""
    scale = results.get("training_config", {}).get("backbone_lr_scale", 1)
    lines = f"- appropriator: {TRAINING_MODES[mode].format(scale=scale)}, from `{results['model']}`\n"
    if results.get("pretraining_seen_classes") is not None:
        seen, unseen = results.get("eval_accuracy_seen_classes"), results.get("eval_accuracy_unseen_classes")
        def fmt(value):
            return "-" if value is None else f"{value:.4f}"
        lines += (f"- on classes the backbone was pretrained on ({', '.join(results['pretraining_seen_classes']) or 'none'}): "
                  f"**{fmt(seen)}**; on the others: **{fmt(unseen)}**\n")
    return lines


def _input_line(results: dict) -> str:
    """The size the victim saw and how its images got there (older results.json: not recorded)."""
    size, preprocessing = results.get("input_size"), results.get("preprocessing") or {}
    if size is None:
        return "- input: not recorded"
    if preprocessing.get("transforms") == "timm":
        return (f"- input: {size[0]}x{size[1]} px through timm's transforms for the weights (training: RandomResizedCrop, "
                f"flip, colour jitter; evaluation: resize + centre crop at crop_pct {preprocessing.get('crop_pct')}, "
                f"{preprocessing.get('interpolation')}; mean {list(preprocessing.get('mean', []))}, std {list(preprocessing.get('std', []))})")
    return f"- input: {size[0]}x{size[1]} px, random crop (padding {preprocessing.get('crop_padding')}) and flip"


def victim_model_card(repo_id: str | None, results: dict, curve_file: str):
    """Card of a victim: clean test accuracy in ``model-index``, the (protected) data it saw."""

    name = (repo_id or f"{results['model']}-victim").split("/")[-1]
    eval_id = results["eval_dataset"]
    train_id = results["dataset"]
    eval_results = [EvalResult(
        task_type="image-classification", task_name="Image Classification", dataset_type=eval_id,
        dataset_name=eval_id, dataset_split=results["eval_split"], dataset_revision=results.get("eval_dataset_revision"),
        metric_type="accuracy", metric_value=round(results["eval_accuracy"], 4),
        metric_name=f"clean test accuracy ({results['num_eval']} images)",
    )]
    data = ModelCardData(
        library_name="transformers", tags=["sep-hf", "victim", "timm", "image-classification", results["defense"]],
        # Hub datasets only (they have a revision); a local folder is named in the text by its folder name
        datasets=list(dict.fromkeys(d for d, revision in ((train_id, results.get("dataset_revision")),
                                                          (eval_id, results.get("eval_dataset_revision"))) if revision)),
        metrics=["accuracy"],
        model_name=name, eval_results=eval_results, pipeline_tag="image-classification",
        base_model=results.get("base_model"),
    )
    reference = results.get("clean_reference_accuracy")
    settings = results.get("defense_settings") or {}
    defense_section = ""
    if settings:
        defense_section = (f"\n## Defense: `{results['defense']}`\n\n```json\n{json.dumps(settings, indent=2, sort_keys=True)}\n```\n"
                           + (f"\n{settings['note']}.\n" if settings.get("note") else ""))
    return ModelCard.from_template(
        data, template_path=TEMPLATES / "victim_model_card.md", name=name, model=results["model"], train_id=train_id,
        revision=f" at revision `{results['dataset_revision']}`" if results.get("dataset_revision") else "",
        num_train=results["num_train"], defense=defense_label(results["defense"], settings),
        eval_split=results["eval_split"], eval_id=eval_id, eval_accuracy=results["eval_accuracy"],
        num_eval=results["num_eval"], pretraining_lines=_pretraining_lines(results),
        reference_line=(f"- clean-trained reference (same recipe, clean data): **{reference:.4f}**"
                        if reference is not None else "- clean-trained reference: not measured for this run"),
        epochs=results["training_config"]["epochs"], train_seconds=results["train_seconds"], history=results["history"],
        input_line=_input_line(results),
        curve_file=curve_file, defense_section=defense_section, load_from=repo_id or "OUTPUT_DIR/model")
