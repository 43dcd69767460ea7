"""The redesign's promises: the sep-hf command, the budget type, one grayscale formula, TrainingArguments
reachable from train-victim, a license on every dataset card."""

from dataclasses import fields
from importlib.metadata import entry_points

import numpy as np
import pytest
import tomllib
import torch
from conftest import REPO_ROOT
from huggingface_hub import DatasetCard
from PIL import Image
from transformers import TrainingArguments

from sep_hf import cli, squeezes
from sep_hf.budget import Budget
from sep_hf.data.images import convert_mode
from sep_hf.data.load import ImageColumns, ImageDataset
from sep_hf.protect.job import source_license
from sep_hf.publish.cards import protected_dataset_card
from sep_hf.utils.presets import apply_preset
from sep_hf.victim import trainer as victim_trainer
from sep_hf.victim.trainer import TrainerArguments, VictimTrainingConfig, train_victim


def test_console_script_is_the_cli_main():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"sep-hf": "sep_hf.cli:main"}
    installed = {point.name: point.value for point in entry_points(group="console_scripts")}
    assert installed.get("sep-hf", "sep_hf.cli:main") == "sep_hf.cli:main"


def test_unknown_command_prints_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["craft"])
    assert exit_info.value.code == 2 and "sep-hf {protect,train-source,train-victim}" in capsys.readouterr().err


@pytest.fixture
def accelerate_state_of_another_precision():
    """accelerate's process-wide state as an earlier in-process run (a Trainer, a notebook cell) leaves it, with
    the other mixed precision than the CLI's; the state the session had is put back afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    states = (AcceleratorState, PartialState, GradientState)
    saved = [dict(state._shared_state) for state in states]
    AcceleratorState._reset_state(reset_partial_state=True)
    ours = cli.resolve_mixed_precision("auto", use_cpu=False)
    Accelerator(cpu=True, mixed_precision="no" if ours == "bf16" else "bf16")
    yield
    for state, shared in zip(states, saved):
        state._shared_state.clear()
        state._shared_state.update(shared)


def test_user_error_is_one_line_before_any_compute(capsys, tmp_path, accelerate_state_of_another_precision):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["protect", "--dataset", str(tmp_path), "--method", "sep", "--eps", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: --eps 0.5 is below one 1/255 level")


def test_budget_is_whole_levels_from_the_flag_to_the_pixels():
    assert Budget.from_eps(None) == Budget(8) and str(Budget.from_eps(1.5)) == "1/255"
    assert Budget.from_eps(8).pixels == 8 / 255 and Budget.from_pixels(8 / 255).levels == 8
    assert Budget.from_pixels(2.5 / 255).levels == 2
    for bad in (0.5, 0, 300):
        with pytest.raises(ValueError, match="--eps"):
            Budget.from_eps(bad)
    with pytest.raises(ValueError):
        Budget(0)
    original = torch.rand(4, 3, 8, 8)
    clamped = Budget(2).clamp(original + torch.randn_like(original), original)
    levels = (clamped * 255).round() - (original * 255).round()
    assert levels.abs().max() <= 2 and torch.equal(clamped, (clamped * 255).round() / 255)


def test_one_grayscale_formula_pil_convert_l():
    rgb = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(image.permute(1, 2, 0).numpy()).convert("L")))
                       for image in rgb]).unsqueeze(1)
    assert torch.equal(squeezes.grayscale(rgb), pil.expand(-1, 3, -1, -1))  # the grayscale defense
    assert torch.equal(convert_mode(rgb, "L"), pil)  # an RGB dataset published as L
    assert (squeezes.grayscale(rgb.float() / 255) * 255 - pil.float()).abs().max() <= 0.51  # the differentiable view


class RecordingTrainingArguments(TrainingArguments):  # module level: Trainer pickles its arguments
    seen: dict = {}

    def __init__(self, **kwargs):
        self.seen.update(kwargs)
        super().__init__(**kwargs)


def test_trainer_arguments_reach_trainer(cifar_small, tmp_path, monkeypatch):
    assert {f.name for f in fields(TrainerArguments)} <= {f.name for f in fields(TrainingArguments)}
    parsed = cli.train_victim_parser().parse_args_into_dataclasses(
        ["--dataset", "x", "--report_to", "none", "--dataloader_num_workers", "1", "--run_name", "victim-x"])
    (trainer_args,) = [item for item in parsed if isinstance(item, TrainerArguments)]
    seen = RecordingTrainingArguments.seen
    seen.clear()
    monkeypatch.setattr(victim_trainer, "TrainingArguments", RecordingTrainingArguments)
    data = cifar_small.__class__(**{**cifar_small.__dict__, "train_images": cifar_small.train_images[:100],
                                    "train_labels": cifar_small.train_labels[:100],
                                    "eval_images": cifar_small.eval_images[:50], "eval_labels": cifar_small.eval_labels[:50]})
    config = VictimTrainingConfig(model="smallnet_cifar", epochs=1, batch_size=50)
    apply_preset("cpu", config)
    results = train_victim(config, data, tmp_path, trainer_args=trainer_args)
    assert seen["dataloader_num_workers"] == 1 and seen["run_name"] == "victim-x" and seen["report_to"] == "none"
    assert results["trainer_arguments"]["dataloader_num_workers"] == 1


def _results(**extra):
    return {"eps": 8, "method": "sep", "mean_psnr": 35.0, "dataset": "uoft-cs/cifar10", "dataset_revision": "b" * 40,
            "splits": {"train": {"num_examples": 10, "max_linf": 8, "mean_psnr": 35.0, "mean_l2": 1.2}},
            "config": {"method": "sep"}, **extra}


def test_dataset_card_states_a_license():
    data, body = protected_dataset_card(_results(license="cc-by-4.0", license_from="flag"), [], "grid.png")
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")
    assert card.data.license == "cc-by-4.0" and "license: `cc-by-4.0`" in card.text
    data, body = protected_dataset_card(_results(license=None, license_from=None), [], "grid.png")
    assert data.license == "unknown" and "pass --license" in body


def test_source_license_is_read_from_a_local_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# photos\n")
    dataset = ImageDataset("photos", str(tmp_path), None, None, ImageColumns("image", "label", ("a", "b")))
    assert source_license(dataset) == "mit"
    (tmp_path / "README.md").unlink()
    assert source_license(dataset) is None
