"""Model and dataset card text and figures. Every number a card states comes from a results dict."""

from __future__ import annotations

import io
import json

import torch

__all__ = ["training_curve_png", "source_model_card"]


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def training_curve_png(history: list[dict], title: str = "Source training") -> bytes:
    """Clean test accuracy and train loss per epoch, checkpoints marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, accuracy_axis = plt.subplots(figsize=(6, 3.5))
    accuracy_axis.plot(epochs, [row["clean_test_accuracy"] for row in history], "o-", color="tab:blue", ms=3)
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("clean test accuracy", color="tab:blue")
    accuracy_axis.set_ylim(0, 1)
    loss_axis = accuracy_axis.twinx()
    loss_axis.plot(epochs, [row["train_loss"] for row in history], "s--", color="tab:red", ms=3)
    loss_axis.set_ylabel("train loss", color="tab:red")
    accuracy_axis.set_title(title)
    accuracy_axis.grid(alpha=0.3)
    return _figure_png(fig)


def _yaml_front_matter(data) -> str:
    return f"---\n{data.to_yaml()}\n---\n"


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
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id or "sep-hf source run"
    final = history[-1] if history else None
    eval_results = []
    if final is not None and not dataset_id.startswith("/"):
        from huggingface_hub import EvalResult

        eval_results.append(EvalResult(
            task_type="image-classification", task_name="Image Classification", dataset_type=dataset_id,
            dataset_name=dataset_id, dataset_split="test", dataset_revision=dataset_revision,
            metric_type="accuracy", metric_value=round(final["clean_test_accuracy"], 4),
            metric_name=f"clean test accuracy (first {num_eval} test images)",
        ))
    data = ModelCardData(
        library_name="sep-hf", tags=["sep-hf", "self-ensemble-protection", "image-classification", "timm"],
        datasets=[dataset_id] if not dataset_id.startswith("/") else None, metrics=["accuracy"],
        model_name=name.split("/")[-1], eval_results=eval_results or None, pipeline_tag="image-classification",
    )
    rows = "\n".join(
        f"| {ckpt['epoch']} | `checkpoints/epoch-{ckpt['epoch']:03d}/` | {ckpt['train_loss']:.4f} | {ckpt['clean_test_accuracy']:.4f} |"
        for ckpt in checkpoints
    )
    config_json = json.dumps(training_config, indent=2, sort_keys=True)
    revision = f" at revision `{dataset_revision}`" if dataset_revision else ""
    text = f"""{_yaml_front_matter(data)}
# {name}

Source-model checkpoints for **Self-Ensemble Protection** (SEP, Chen et al., ICLR 2023), trained with
`sep-hf` (`recipes/train_source.py`). Each `checkpoints/epoch-XXX/` holds `model.safetensors`
(weights of `{model_config['model_name']}`, input pixels in [0, 1], normalization inside the model),
`record.json` (epoch, step, loss, accuracy, architecture, class names, dataset revision, file hashes)
and `training_state.pt` (optimizer and scheduler, to resume).

Trained on {num_train} images of `{dataset_id}`{revision}; accuracy on the first {num_eval} clean test images.

## Checkpoints

| epoch | folder | train loss | clean test accuracy |
|---:|---|---:|---:|
{rows}

![accuracy and loss per epoch]({curve_file})

## Use as a SEP ensemble

```python
from sep_hf import CheckpointEnsemble
ensemble = CheckpointEnsemble.from_pretrained("{repo_id or 'OUTPUT_DIR'}", num_models={len(checkpoints)})
```

## Training configuration

```json
{config_json}
```

Model: `{json.dumps(model_config, sort_keys=True)}`
"""
    return ModelCard(text)
