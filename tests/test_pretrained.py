"""The pretrained appropriator: victims fine-tuned or linearly probed from a timm backbone on the (loopback) Hub."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import CIFAR10_DIR, REPO_ROOT, files_containing, run_recipe
from safetensors.torch import load_file

from sep_hf.models import build_model, pretrained_weights_name
from sep_hf.source.recipe import parameter_groups
from sep_hf.testing.backbone import export_timm_backbone
from sep_hf.victim.trainer import VictimTrainingConfig, accuracy_by_class, build_victim_model

SEEN = ["airplane", "automobile", "bird", "cat", "deer"]  # the backbone's classes: half of CIFAR-10's
TINY = ["--dataset", str(CIFAR10_DIR), "--preset", "cpu", "--max_train_samples", "200", "--max_eval_samples", "100",
        "--epochs", "1", "--batch_size", "50"]


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory, tiny_source_run):
    """A 5-class smallnet whose features are the tiny source run's, exported as a timm model folder."""
    from sep_hf.source.checkpoints import list_checkpoints

    trained = list_checkpoints(tiny_source_run)[-1].load_state_dict()
    model = build_model("smallnet_cifar", 5, 32, mean=(0.5, 0.45, 0.4), std=(0.25, 0.24, 0.26))
    model.load_state_dict({k: v for k, v in trained.items() if ".fc." not in k and k not in ("mean", "std")}, strict=False)
    return export_timm_backbone(model, tmp_path_factory.mktemp("export") / "cifar5-backbone", SEEN), model


@pytest.fixture(scope="module")
def backbone_repo(loopback_hub, backbone_folder):
    from conftest import make_unique_repo_id
    from huggingface_hub import HfApi

    repo_id = make_unique_repo_id("cifar5-backbone")
    api = HfApi()
    api.create_repo(repo_id, private=False)
    api.upload_folder(repo_id=repo_id, folder_path=str(backbone_folder[0]))
    return repo_id


def backbone_weights(model_dir) -> dict:
    """The victim's saved timm weights, without TimmWrapper's prefix."""
    return {k.removeprefix("timm_model."): v for k, v in load_file(model_dir / "model.safetensors").items()}


def test_model_names_resolve_to_timm_sources(tmp_path):
    assert pretrained_weights_name("hf-hub:org/x") == "hf-hub:org/x"
    assert pretrained_weights_name("org/x") == "hf-hub:org/x"
    assert pretrained_weights_name(str(tmp_path)) == f"local-dir:{tmp_path.resolve()}"
    assert pretrained_weights_name("resnet18.a1_in1k", pretrained=True) == "resnet18.a1_in1k"
    assert pretrained_weights_name("smallnet_cifar") is None
    assert VictimTrainingConfig(model="org/x").pretrained  # a repo is its weights


def test_linear_probe_needs_pretrained_weights():
    with pytest.raises(ValueError, match="--linear_probe fits a classifier on a pretrained backbone"):
        VictimTrainingConfig(model="smallnet_cifar", linear_probe=True).weights_name()


def test_accuracy_by_class_splits_seen_and_unseen():
    names = ["a", "b", "c"]
    out = accuracy_by_class([0, 1, 1, 2, 0], [0, 1, 2, 2, 2], names, ["b", "a", "z"])
    assert out["eval_accuracy_per_class"] == {"a": 1.0, "b": 1.0, "c": pytest.approx(1 / 3)}
    assert out["pretraining_seen_classes"] == ["a", "b"]
    assert out["eval_accuracy_seen_classes"] == 1.0 and out["eval_accuracy_unseen_classes"] == pytest.approx(1 / 3)
    assert "eval_accuracy_seen_classes" not in accuracy_by_class([0], [0], names)


def test_pretrained_victim_loads_weights_and_fine_tunes_backbone_slower(backbone_folder):
    folder, pretrained = backbone_folder
    config = VictimTrainingConfig(model=str(folder), learning_rate=0.1, backbone_lr_scale=0.1)
    model = build_victim_model(config, [str(i) for i in range(10)], (32, 32))
    weights = model.timm_model.state_dict()
    for key, value in pretrained.backbone.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(weights[key], value), key
    assert model.timm_model.fc.out_features == 10
    assert model.timm_model.pretrained_cfg["label_names"] == SEEN
    backbone_group, head_group = parameter_groups(model.timm_model, config)
    assert backbone_group["lr"] == pytest.approx(0.01) and "lr" not in head_group
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.timm_model.fc.parameters()}


def test_pretrained_victim_from_hub_repo(backbone_repo, backbone_folder, tmp_path):
    """--model hf-hub:org/name: timm's loader, the backbone's normalization, seen/unseen accuracy, base_model."""
    out = tmp_path / "ft"
    run_recipe("train_victim.py", [*TINY, "--model", f"hf-hub:{backbone_repo}", "--backbone_lr_scale", "0",
                                   "--output_dir", out])
    results = json.loads((out / "results.json").read_text())
    assert results["training_mode"] == "pretrained-ft" and results["base_model"] == backbone_repo
    assert results["normalization"]["mean"] == pytest.approx([0.5, 0.45, 0.4])
    assert results["pretraining_seen_classes"] == SEEN
    assert set(results["eval_accuracy_per_class"]) == {*SEEN, "dog", "frog", "horse", "ship", "truck"}
    for key in ("eval_accuracy_seen_classes", "eval_accuracy_unseen_classes"):
        assert 0 <= results[key] <= 1
    # the backbone at learning rate 0 keeps the Hub weights; only BatchNorm statistics and the new head move
    saved, pretrained = backbone_weights(out / "model"), backbone_folder[1].backbone.state_dict()
    convs = [k for k in pretrained if k.endswith(".weight") and pretrained[k].dim() == 4]
    assert convs and all(torch.equal(saved[k], pretrained[k]) for k in convs)
    assert not torch.equal(saved["stem.1.running_mean"], pretrained["stem.1.running_mean"])
    card = (out / "model" / "README.md").read_text()
    assert f"base_model: {backbone_repo}" in card
    assert "on classes the backbone was pretrained on (airplane, automobile, bird, cat, deer)" in card


def test_linear_probe_from_local_folder_freezes_backbone(backbone_folder, tmp_path):
    """--linear_probe: every backbone tensor (BatchNorm statistics too) as loaded; the folder's path is never written."""
    folder, pretrained = backbone_folder
    out = tmp_path / "probe"
    run_recipe("train_victim.py", [*TINY, "--model", str(folder), "--linear_probe", "--output_dir", out])
    results = json.loads((out / "results.json").read_text())
    assert results["training_mode"] == "linear-probe" and results["model"] == folder.name
    assert results["base_model"] is None
    saved, reference = backbone_weights(out / "model"), pretrained.backbone.state_dict()
    for key, value in reference.items():
        if not key.startswith("fc."):
            assert torch.equal(saved[key], value), key
    assert saved["fc.weight"].shape == (10, 160)
    assert files_containing(out, str(folder.parent).encode()) == []


@pytest.mark.parametrize("args, message", [
    (["--model", "hf-hub:org/no-such-backbone"], "timm cannot load pretrained weights"),
    (["--model", "smallnet_cifar", "--linear_probe"], "--linear_probe fits a classifier"),
])
def test_bad_backbone_is_one_line_before_compute(loopback_hub, tmp_path, args, message):
    command = ["recipes/train_victim.py", *TINY, *args, "--output_dir", str(tmp_path / "bad")]
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in result.stderr
    assert "Decoding" not in result.stderr and not (tmp_path / "bad").exists()  # nothing loaded or trained


def test_source_fine_tuned_from_backbone_rebuilds_offline(backbone_folder, tmp_path):
    """train_source.py --model FOLDER: checkpoints of a fine-tuning trajectory, loadable as an ensemble
    without the backbone's repo (they name the architecture, and keep the backbone's normalization)."""
    from sep_hf import CheckpointEnsemble
    from sep_hf.source.checkpoints import list_checkpoints

    folder, pretrained = backbone_folder
    out = tmp_path / "ft-source"
    run_recipe("train_source.py", [*TINY, "--model", str(folder), "--epochs", "2", "--num_checkpoints", "2",
                                   "--output_dir", out])
    ensemble = CheckpointEnsemble.from_pretrained(out)
    assert len(ensemble.models) == 2
    record = list_checkpoints(out)[0].record["model"]
    assert record["model_name"] == "smallnet_cifar" and record["pretrained_from"] == folder.name
    assert ensemble.models[0].config["mean"] == pytest.approx([0.5, 0.45, 0.4])
