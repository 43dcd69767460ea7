"""A protection and a defense written in ONE temporary module reach --help, a run and the cards.

The module lives outside the package (``SEP_HF_PLUGINS`` names it), so the test proves that no
other file has to be edited: no registry list, no recipe, no card template.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CIFAR10_DIR, REPO_ROOT

PLUGIN = textwrap.dedent('''
    """A throwaway protection (a label-keyed checkerboard at the budget) and defense (horizontal flips)."""
    from dataclasses import asdict, dataclass, field

    import torch

    from sep_hf.defenses import register_defense
    from sep_hf.defenses.base import Defense
    from sep_hf.protect import register_protection
    from sep_hf.protect.base import ProtectionTransform, config_hash


    @dataclass
    class CheckerArguments:
        checker_period: int = field(default=2, metadata={"help": "Checkerboard period in pixels."})


    @dataclass
    class CheckerConfig:
        eps: float
        period: int


    @register_protection("checker")
    class Checker(ProtectionTransform):
        arguments = CheckerArguments
        paper = {"title": "A throwaway test protection", "authors": "tests", "url": "https://example.org"}

        def __init__(self, config, image_column, label_column):
            super().__init__(image_column, label_column, return_stats=True)
            self.config, self.name = config, "checker"

        @classmethod
        def from_arguments(cls, context, name):
            period = context.arguments(CheckerArguments).checker_period
            return cls(CheckerConfig(context.eps, period), context.columns.image, context.columns.label)

        def protect(self, images, labels, indices):
            h, w = images.shape[2:]
            grid = ((torch.arange(h).view(-1, 1) // self.config.period + torch.arange(w).view(1, -1)
                     // self.config.period) % 2).float() * 2 - 1
            sign = torch.where(labels % 2 == 0, 1.0, -1.0).view(-1, 1, 1, 1)
            return (images + self.config.eps * sign * grid).clamp(0, 1)

        def fingerprint(self):
            return config_hash("checker", asdict(self.config))

        def card_lines(self, results):
            return [f"- checker protection with period {self.config.period} (throwaway test plug-in)"]


    @dataclass
    class HFlipArguments:
        hflip_fraction: float = field(default=1.0, metadata={"help": "Share of training images flipped."})


    @register_defense("hflip")
    class HFlip(Defense):
        arguments = HFlipArguments

        def prepare_training_images(self, images):
            count = round(len(images) * self.settings.hflip_fraction)
            flipped = images.clone()
            flipped[:count] = images[:count].flip(3)
            return flipped
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plug-in module on the import path, and both registries reloaded to pick it up (undone after)."""
    from sep_hf.defenses import DEFENSES
    from sep_hf.protect import PROTECTIONS

    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "throwaway_sep_hf_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("SEP_HF_PLUGINS", "throwaway_sep_hf_plugin")
    for registry in (PROTECTIONS, DEFENSES):
        registry.load()
        monkeypatch.setattr(registry, "_classes", dict(registry._classes))
        monkeypatch.setattr(registry, "_loaded", False)
    yield folder
    sys.modules.pop("throwaway_sep_hf_plugin", None)


def _help(recipe: str, plugin_folder) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_folder), str(REPO_ROOT)])}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "recipes" / recipe), "--help"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow  # runs every recipe's --help in a fresh interpreter
def test_plugin_protection_and_defense_appear_in_help(plugin):
    protect_help = _help("protect.py", plugin)
    options = protect_help.split("options:", 1)[1]
    assert "checker" in options.split("--method METHOD", 1)[1].split("--eps", 1)[0]
    assert "--checker_period" in protect_help
    victim_help = _help("train_victim.py", plugin)
    assert "hflip" in victim_help.split("options:", 1)[1].split("--defense DEFENSE", 1)[1].split("--", 1)[0]
    assert "--hflip_fraction" in victim_help


def test_plugin_protection_crafts_and_states_itself_on_the_card(plugin, tmp_path, accelerator):
    import datasets

    from sep_hf.arguments import RunArguments
    from sep_hf.data.view import DataArguments
    from sep_hf.protect import get_protection
    from sep_hf.protect.job import ProtectArguments, run_protection
    from sep_hf.source.recipe import SourceTrainingConfig

    checker_arguments = get_protection("checker").arguments(checker_period=4)
    results = run_protection(ProtectArguments(method="checker", eps=4, splits=["train"]),
                             DataArguments(dataset=str(CIFAR10_DIR), max_train_samples=40),
                             SourceTrainingConfig(), RunArguments(output_dir=str(tmp_path / "run"), preset="cpu"),
                             accelerator, [checker_arguments])
    assert results["method"] == "checker" and results["eps"] == 4 and results["max_linf"] == 4
    card = (tmp_path / "run" / "dataset" / "README.md").read_text()
    assert "checker protection with period 4 (throwaway test plug-in)" in card
    assert "A throwaway test protection" in card
    published = datasets.load_dataset(str(tmp_path / "run" / "dataset"))["train"]
    assert published.num_rows == 40


def test_plugin_defense_trains_a_victim_and_reaches_its_card(plugin, tmp_path):
    from sep_hf.arguments import HubArguments, RunArguments
    from sep_hf.data.view import DataArguments
    from sep_hf.defenses import get_defense
    from sep_hf.victim.job import VictimArguments, run_victim
    from sep_hf.victim.trainer import VictimTrainingConfig

    hflip_arguments = get_defense("hflip").arguments(hflip_fraction=0.5)
    config = VictimTrainingConfig(model="smallnet_cifar", defense="hflip", epochs=1, batch_size=50)
    results = run_victim(config, DataArguments(dataset=str(CIFAR10_DIR), max_train_samples=100, max_eval_samples=50),
                         RunArguments(output_dir=str(tmp_path / "victim"), preset="cpu"), HubArguments(),
                         VictimArguments(), [hflip_arguments])
    assert results["defense"] == "hflip" and results["defense_settings"] == {"fraction": 0.5}
    card = (tmp_path / "victim" / "model" / "README.md").read_text()
    assert "hflip (fraction 0.5)" in card


def test_a_flag_of_another_plugin_defense_is_refused(plugin):
    from sep_hf.defenses import build_defense, get_defense

    with pytest.raises(ValueError, match="--hflip_fraction only applies to --defense hflip"):
        build_defense("none", [get_defense("hflip").arguments(hflip_fraction=0.3)])
    assert torch.equal(build_defense("hflip", []).prepare_training_images(torch.arange(4).view(1, 1, 1, 4)),
                       torch.arange(4).flip(0).view(1, 1, 1, 4))
