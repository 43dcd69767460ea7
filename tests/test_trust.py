"""The protection job refuses what it cannot publish honestly, and publishes nothing it should not.

Each test checks one behaviour of ``sep_hf.protect.job.run_protection`` (in-process) or of the
recipe / data helpers around it: budget rounding, refusals before any crafting, resume of a
damaged shard, ``--resize``, no local paths on the public card, write access before compute, and
no echo of a secret CUDA key. Datasets are tiny (tens of images) Hub-layout parquet folders built
from the shared CIFAR-10 copy.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import CIFAR10_DIR, REPO_ROOT
from PIL import Image

from sep_hf.arguments import RunArguments
from sep_hf.data.load import DatasetError
from sep_hf.data.view import DataArguments, load_training_data
from sep_hf.protect.job import ProtectArguments, run_protection
from sep_hf.protect.methods.sep import SEPArguments, SEPTransform
from sep_hf.publish.hub import HubError
from sep_hf.source.checkpoints import CheckpointError
from sep_hf.source.recipe import SourceTrainingConfig
from sep_hf.utils.presets import apply_preset

NUM_TRAIN = 20


# --------------------------------------------------------------------------------------------
# helpers


def _cifar(num_rows: int, split: str = "train"):
    """The first rows of the shared CIFAR-10 parquet: (encoded image bytes, labels)."""
    path = sorted((CIFAR10_DIR / "data").glob(f"{split}-*.parquet"))[0]
    table = pq.read_table(path).slice(0, num_rows)
    return [cell["bytes"] for cell in table.column("img").to_pylist()], table.column("label").to_pylist()


def _cifar_classes() -> datasets.ClassLabel:
    """CIFAR-10's ClassLabel, from the folder's card (its parquet files carry no feature metadata)."""
    card = yaml.safe_load((CIFAR10_DIR / "README.md").read_text().split("---")[1])
    feature = next(f for f in card["dataset_info"]["features"] if f["name"] == "label")
    names = feature["dtype"]["class_label"]["names"]
    return datasets.ClassLabel(names=[names[key] for key in sorted(names, key=int)])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _split(images: list[bytes], labels: list[int], label_feature) -> datasets.Dataset:
    features = datasets.Features({"img": datasets.Image(), "label": label_feature})
    return datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b in images], "label": labels},
                                      features=features)


def _write_folder(folder, splits: dict[str, datasets.Dataset]):
    """A Hub-layout folder (data/{split}-00000-of-00001.parquet) that load_dataset(folder) reads."""
    (folder / "data").mkdir(parents=True)
    for name, split in splits.items():
        split.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    return folder


def _cifar_folder(folder, train_labels=None, test_labels=None, num_train=NUM_TRAIN, num_test=5, **train_overrides):
    """A small CIFAR-10 folder (the 10 CIFAR classes), with optional label / image overrides."""
    train_images, labels = _cifar(num_train)
    test_images, test_default = _cifar(num_test, "test")
    train_images = train_overrides.get("train_images", train_images)
    return _write_folder(folder, {
        "train": _split(train_images, train_labels or labels, _cifar_classes()),
        "test": _split(test_images, test_labels or test_default, _cifar_classes()),
    })


def _protect(output_dir, dataset, checkpoints, accelerator, protect=None, data=None, sep=None):
    """run_protection with method sep, 1 step, 2 checkpoints, at most 20 train / 10 eval images."""
    return run_protection(
        ProtectArguments(**{"method": "sep", **(protect or {})}),
        DataArguments(**{"dataset": str(dataset), "max_train_samples": NUM_TRAIN, "max_eval_samples": 10,
                         **(data or {})}),
        SourceTrainingConfig(),
        RunArguments(output_dir=str(output_dir), preset="cpu"),
        accelerator,
        [SEPArguments(**{"steps": 1, "checkpoints": str(checkpoints), "num_models": 2, **(sep or {})})],
    )


def _published_images(output_dir, split: str = "train") -> list[bytes]:
    files = sorted((output_dir / "dataset" / "data").glob(f"{split}-*.parquet"))
    assert files, f"no published {split} parquet under {output_dir / 'dataset'}"
    return [cell["bytes"] for path in files for cell in pq.read_table(path).column("img").to_pylist()]


def _decode(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16))


# --------------------------------------------------------------------------------------------
# 1. budgets are whole 1/255 levels


def test_eps_below_one_level_is_refused_before_crafting(tiny_source_run, tmp_path, accelerator):
    with pytest.raises(ValueError, match=r"--eps 0\.5 is below one 1/255 level"):
        _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator, protect={"eps": 0.5, "splits": ["train"]})
    assert not (tmp_path / "shards").exists(), "crafting started before the budget check"


def test_fractional_eps_is_applied_and_stated_as_whole_levels(tiny_source_run, tmp_path, accelerator):
    results = _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator, protect={"eps": 1.5, "splits": ["train"]})
    assert results["eps"] == 1 and 0 < results["max_linf"] <= 1
    clean, _ = _cifar(NUM_TRAIN)
    published = _published_images(tmp_path)
    assert max(int((_decode(a) - _decode(b)).abs().max()) for a, b in zip(clean, published)) <= 1
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert "eps = 1/255" in card and "|x' - x| <= 1/255" in card
    assert not re.search(r"(?<![\d.])1\.5(?!\d)", card), "the card states the requested 1.5, not the applied 1/255"


# --------------------------------------------------------------------------------------------
# 2.-5. refusals before any crafting


def test_single_class_dataset_is_refused_for_sep(tiny_source_run, tmp_path, accelerator):
    images, _ = _cifar(NUM_TRAIN)
    folder = _write_folder(tmp_path / "one-class", {"train": _split(images, [0] * NUM_TRAIN,
                                                                    datasets.ClassLabel(names=["only"]))})
    with pytest.raises(ValueError, match=r"--method sep pushes every image towards another class, but dataset "
                                         r"'.*' has 1 class: it would change nothing"):
        _protect(tmp_path / "run", folder, tiny_source_run, accelerator)
    assert not (tmp_path / "run" / "shards").exists()


def test_unperturbed_output_is_refused(tiny_source_run, tmp_path, accelerator, monkeypatch):
    monkeypatch.setattr(SEPTransform, "protect", lambda self, images, labels, indices: images.clone())
    with pytest.raises(RuntimeError, match=r"Split 'train' came out almost unperturbed .*refusing to publish it as "
                                           r"protected"):
        _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator, protect={"splits": ["train"]})
    assert not (tmp_path / "dataset" / "README.md").exists()
    assert not (tmp_path / "results.json").exists()


def test_corrupt_image_names_split_and_row_before_crafting(tiny_source_run, tmp_path, accelerator):
    images, _ = _cifar(12)
    images[7] = b"not a png"
    folder = _cifar_folder(tmp_path / "corrupt", num_train=12, train_images=images)
    with pytest.raises(DatasetError, match=r"The image in row 7 of column 'img' of split 'train' cannot be decoded"):
        _protect(tmp_path / "run", folder, tiny_source_run, accelerator)
    assert not (tmp_path / "run" / "shards").exists()


def test_unlabeled_rows_are_refused_unless_their_split_is_left_out(tiny_source_run, tmp_path, accelerator):
    _, test_labels = _cifar(5, "test")
    test_labels[1] = test_labels[3] = -1
    folder = _cifar_folder(tmp_path / "unlabeled", test_labels=test_labels)
    with pytest.raises(DatasetError, match=r"Split 'test' has 2 unlabeled rows \(label -1, e\.g\. row 1\).*"
                                           r"\(--splits train\)"):
        _protect(tmp_path / "all", folder, tiny_source_run, accelerator)
    assert not (tmp_path / "all" / "shards").exists()
    results = _protect(tmp_path / "train", folder, tiny_source_run, accelerator, protect={"splits": ["train"]})
    assert results["counts"] == {"train": NUM_TRAIN}


# --------------------------------------------------------------------------------------------
# 6. resume


def test_truncated_shard_is_redone_on_resume(tiny_source_run, tmp_path, accelerator, caplog):
    settings = {"splits": ["train"], "shard_size": 10, "craft_batch_size": 10}
    _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator, protect=settings)
    first = _published_images(tmp_path)
    shards = sorted((tmp_path / "shards" / "train").glob("shard-*.arrow"))
    assert len(shards) == 2
    damaged, intact = shards
    intact_mtime = intact.stat().st_mtime_ns
    with open(damaged, "r+b") as handle:
        handle.truncate(damaged.stat().st_size // 2)

    with caplog.at_level("WARNING", logger="sep_hf"):
        _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator, protect=settings)
    assert f"Crafted shard {damaged.name} is unreadable" in caplog.text
    assert datasets.Dataset.from_file(str(damaged)).num_rows == 10
    assert intact.stat().st_mtime_ns == intact_mtime, "an intact shard was crafted again"
    assert _published_images(tmp_path) == first


# --------------------------------------------------------------------------------------------
# 7. --resize


def _mixed_size_folder(folder):
    images, _ = _cifar(12)
    images[6:] = [_png(Image.open(io.BytesIO(png)).resize((28, 28), Image.BICUBIC)) for png in images[6:]]
    return _cifar_folder(folder, num_train=12, train_images=images)


def test_resize_is_honoured_while_crafting(tiny_source_run, tmp_path, accelerator):
    folder = _mixed_size_folder(tmp_path / "mixed")
    results = _protect(tmp_path / "run", folder, tiny_source_run, accelerator, data={"resize": [32, 32]})
    assert results["counts"] == {"train": 12, "test": 5}
    sizes = {Image.open(io.BytesIO(png)).size for split in ("train", "test")
             for png in _published_images(tmp_path / "run", split)}
    assert sizes == {(32, 32)}


def test_mixed_sizes_without_a_model_size_ask_for_it(tiny_source_run, tmp_path, accelerator):
    folder = _mixed_size_folder(tmp_path / "mixed")
    with pytest.raises(DatasetError, match=r"have different sizes \(28 to 32 px high, 28 to 32 px wide\); pass "
                                           r"--image_size S.*or --resize H W"):
        _protect(tmp_path / "run", folder, tiny_source_run, accelerator)
    assert not (tmp_path / "run" / "shards").exists()


# --------------------------------------------------------------------------------------------
# 8. no local paths on the public card


def test_card_does_not_show_the_local_dataset_path(tiny_source_run, tmp_path, accelerator):
    results = _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator, protect={"splits": ["train"]})
    card = (tmp_path / "dataset" / "README.md").read_text()
    for local in (str(CIFAR10_DIR), str(CIFAR10_DIR.resolve()), str(tmp_path)):
        assert local not in card
    assert results["dataset"] == "cifar10"
    assert json.loads((tmp_path / "results.json").read_text())["dataset"] == "cifar10"


def test_card_does_not_show_the_local_checkpoints_path(tiny_source_run, tmp_path, accelerator):
    _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator, protect={"splits": ["train"]})
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert str(tiny_source_run.resolve()) not in card and str(tiny_source_run) not in card


# --------------------------------------------------------------------------------------------
# 9. write access before compute


def test_read_only_token_fails_before_crafting_and_creates_no_repo(loopback_hub, unique_repo_id, tiny_source_run,
                                                                   tmp_path, accelerator, monkeypatch):
    target = unique_repo_id("trust-read-only")
    monkeypatch.setenv("HF_TOKEN", loopback_hub.read_token)
    with pytest.raises(HubError, match=rf"cannot write dataset repo '{re.escape(target)}': it is a read-only token"):
        _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator,
                 protect={"splits": ["train"], "push_to_hub": True, "hub_dataset_id": target})
    assert not (tmp_path / "shards").exists(), "crafting started before the write check"
    monkeypatch.setenv("HF_TOKEN", loopback_hub.write_token)
    from huggingface_hub import HfApi

    assert not HfApi().repo_exists(target, repo_type="dataset")


# --------------------------------------------------------------------------------------------
# 10. a mistyped CUDA key is not echoed


def test_non_integer_cuda_key_is_not_echoed(tmp_path):
    secret = "s3cr3t-not-a-number"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "protect.py"), "--method", "cuda", "--cuda_key", secret,
         "--dataset", str(CIFAR10_DIR), "--splits", "train", "--max_train_samples", "20", "--preset", "cpu",
         "--output_dir", str(tmp_path / "run")],
        cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--cuda_key does not hold an integer CUDA key" in result.stderr, result.stderr[-3000:]
    assert secret not in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# 11.-13. mismatches and missing checkpoints


def test_eval_dataset_class_count_mismatch_names_both_counts(tmp_path):
    ten = _cifar_folder(tmp_path / "ten", num_train=10, num_test=5)
    images, _ = _cifar(10, "test")
    five = _write_folder(tmp_path / "five", {
        split: _split(images, [i % 5 for i in range(10)], datasets.ClassLabel(names=list("abcde")))
        for split in ("train", "test")})
    with pytest.raises(DatasetError, match=r"Evaluation dataset '.*five' has 5 classes and '.*ten' has 10"):
        load_training_data(DataArguments(dataset=str(ten), eval_dataset=str(five)))


def test_mistyped_checkpoints_path_is_a_checkpoint_error(tmp_path, accelerator, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"Checkpoint folder '\./no/such/run' does not exist"):
        _protect(tmp_path / "run", CIFAR10_DIR, "./no/such/run", accelerator, protect={"splits": ["train"]})
    assert not (tmp_path / "run" / "shards").exists()


def test_more_models_than_checkpoints_names_num_models(tiny_source_run, tmp_path, accelerator):
    with pytest.raises(CheckpointError, match=r"Asked for 99 checkpoints \(--num_models\) but 4 are available"):
        _protect(tmp_path, CIFAR10_DIR, tiny_source_run, accelerator, protect={"splits": ["train"]},
                 sep={"num_models": 99})


def test_em_followers_give_up_when_the_main_process_stops_saving(tmp_path):
    """Non-main processes poll for the main process's EM/REM fit: a state file that stops changing ends the wait."""
    import os
    import time

    from sep_hf.protect.methods.em import NOISE_FILE, STATE_FILE, _wait_for_fit

    state = tmp_path / STATE_FILE
    state.write_bytes(b"state")
    stale = time.time() - 60
    os.utime(state, (stale, stale))
    started = time.time()
    with pytest.raises(TimeoutError, match="made no progress for 1 s"):
        _wait_for_fit(tmp_path, stale_after=1.0)
    assert time.time() - started < 30
    (tmp_path / NOISE_FILE).write_bytes(b"noise")  # a finished fit ends the wait at once
    _wait_for_fit(tmp_path, stale_after=1.0)


def test_unknown_victim_model_names_the_problem_and_close_matches():
    from sep_hf.victim.trainer import VictimTrainingConfig, build_victim_model

    with pytest.raises(ValueError, match=r"Unknown model 'resnet18_cifr'.*Did you mean resnet18_cifar"):
        build_victim_model(VictimTrainingConfig(model="resnet18_cifr"), [str(i) for i in range(10)], (32, 32))


@pytest.mark.parametrize("method, expected", [("sep", 30), ("sep-fa", 30), ("sep-fa-vr", 15)])
def test_paper_preset_compares_the_sep_variants_at_equal_compute(tiny_source_run, tmp_path, accelerator, method, expected):
    """--preset paper: SEP and SEP-FA take 30 checkpoints, SEP-FA-VR 15 + 15 inner steps (the paper's setting)."""
    from sep_hf.protect.methods.sep import SEPConfig

    with pytest.raises(CheckpointError, match=rf"Asked for {expected} checkpoints \(--num_models\) but 4"):
        run_protection(ProtectArguments(method=method),
                       DataArguments(dataset=str(CIFAR10_DIR), max_train_samples=NUM_TRAIN, max_eval_samples=10),
                       SourceTrainingConfig(), RunArguments(output_dir=str(tmp_path), preset="paper"), accelerator,
                       [SEPArguments(steps=1, checkpoints=str(tiny_source_run))])
    assert SEPConfig(method=method, steps=30).gradient_evaluations(expected) == 30 * 30
    source = SourceTrainingConfig()
    apply_preset("paper", source)
    assert source.num_checkpoints >= expected
