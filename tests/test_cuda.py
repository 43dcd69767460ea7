"""CUDA: filters from the key, the convolution itself, mix, key sources, and no key in anything written."""
from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CIFAR10_DIR, files_containing, hub_repo_containing, load_folder, run_recipe
from huggingface_hub import HfApi

from sep_hf.arguments import RunArguments
from sep_hf.data.images import quantize
from sep_hf.data.view import DataArguments
from sep_hf.protect import get_protection
from sep_hf.protect.job import ProtectArguments, run_protection
from sep_hf.protect.methods.cuda import (
    KEY_ENV,
    CUDAArguments,
    CUDAConfig,
    CUDATransform,
    apply_cuda,
    cuda_filters,
    cuda_selected,
    key_fingerprint,
    resolve_cuda_key,
)
from sep_hf.source.recipe import SourceTrainingConfig

KEY = 7319046285519377  # distinctive: its decimal string must never appear in a written file


def test_filters_are_a_pure_function_of_key_and_options():
    filters = cuda_filters(KEY, 10)
    assert filters.shape == (10, 1, 3, 3)
    assert torch.equal(filters, cuda_filters(KEY, 10))
    assert not torch.equal(filters, cuda_filters(KEY + 1, 10)), "different keys must give different filters"
    assert not torch.equal(filters, cuda_filters(KEY, 10, blur=0.5))
    assert cuda_filters(KEY, 10, shared_kernel=False).shape == (10, 3, 3, 3)
    assert cuda_filters(KEY, 100, kernel_size=5).shape == (100, 1, 5, 5)
    flat = filters.flatten(1)
    assert ((flat == 1.0).sum(1) == 1).all(), "one tap set to 1.0 per filter"
    others = flat[flat != 1.0]
    assert others.min() >= 0 and others.max() <= 0.3 and others.std() > 0.05  # uniform in [0, blur]
    assert len({tuple(f.tolist()) for f in flat}) == 10, "one distinct filter per class"


def _reference(images, labels, filters):
    """One image at a time: convolve each channel with the class filter, divide by the maximum, round."""
    out = []
    for image, label in zip(images, labels):
        kernel = filters[label]
        kernel = kernel.expand(3, *kernel.shape[1:]).unsqueeze(1)
        filtered = F.conv2d(image.unsqueeze(0), kernel, padding=kernel.shape[-1] // 2, groups=3)[0]
        out.append((filtered / filtered.max() * 255).round() / 255)
    return torch.stack(out)


@pytest.mark.parametrize("shared_kernel", [True, False])
def test_apply_matches_a_per_image_reference_in_range_on_grid(cifar_small, shared_kernel):
    images, labels = cifar_small.train_images[:32].float() / 255, cifar_small.train_labels[:32]
    filters = cuda_filters(KEY, 10, shared_kernel=shared_kernel)
    protected = apply_cuda(images, labels, filters)
    assert protected.min() >= 0 and protected.max() <= 1
    assert torch.equal(quantize(protected).float() / 255, protected), "not on the 1/255 grid"
    assert (protected.amax(dim=(1, 2, 3)) == 1).all(), "each image is rescaled by its own maximum"
    reference = _reference(images, labels, filters)
    assert (protected - reference).abs().max() <= 1 / 255 + 1e-6  # rounding ties only
    assert (protected != reference).float().mean() < 0.001
    assert (quantize(protected).int() - quantize(images).int()).abs().float().mean() > 5  # visibly changed


def test_average_channels_is_the_official_grayscale_variant(cifar_small):
    """--cuda_average_channels: the filtered channels' mean on every channel, then divided by its maximum."""
    images, labels = cifar_small.train_images[:32].float() / 255, cifar_small.train_labels[:32]
    filters = cuda_filters(KEY, 10)
    grey = apply_cuda(images, labels, filters, average_channels=True)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    colour = _reference(images, labels, filters)
    mean = colour.mean(1, keepdim=True)  # the reference's channels are already divided by one common max
    assert (grey - (mean / mean.amax(dim=(1, 2, 3), keepdim=True)).expand_as(grey)).abs().max() <= 1.5 / 255
    assert CUDAArguments(cuda_average_channels=True).config().average_channels
    assert not torch.equal(grey, apply_cuda(images, labels, filters))


def test_mix_picks_a_fraction_from_key_and_global_index(cifar_small):
    indices = torch.arange(20_000)
    chosen = cuda_selected(KEY, indices, 0.3)
    assert abs(chosen.float().mean().item() - 0.3) < 0.015
    assert torch.equal(cuda_selected(KEY, indices[[7, 3, 19_999]], 0.3), chosen[[7, 3, 19_999]])
    assert not torch.equal(chosen, cuda_selected(KEY + 1, indices, 0.3))
    images, labels = cifar_small.train_images[:200].float() / 255, cifar_small.train_labels[:200]
    transform = CUDATransform(KEY, 10, CUDAConfig(mix=0.5))
    protected = transform.protect(images, labels, torch.arange(1000, 1200))
    changed = (protected != images).flatten(1).any(1)
    assert torch.equal(changed, cuda_selected(KEY, torch.arange(1000, 1200), 0.5))


def test_key_sources_and_errors(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert resolve_cuda_key(CUDAArguments(cuda_key=str(KEY))) == KEY
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    assert resolve_cuda_key(CUDAArguments(cuda_key_file=str(key_file))) == KEY
    monkeypatch.setenv(KEY_ENV, str(KEY + 5))
    assert resolve_cuda_key(CUDAArguments()) == KEY + 5
    assert resolve_cuda_key(CUDAArguments(cuda_key=str(KEY))) == KEY, "a flag wins over the environment"
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match="needs a private key: pass --cuda_key_file"):
        resolve_cuda_key(CUDAArguments())
    with pytest.raises(ValueError, match="either --cuda_key or --cuda_key_file"):
        resolve_cuda_key(CUDAArguments(cuda_key="1", cuda_key_file=str(key_file)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_cuda_key(CUDAArguments(cuda_key_file=str(tmp_path / "missing")))
    key_file.write_text("hunter2-secret")
    with pytest.raises(ValueError, match="does not hold an integer") as error:
        resolve_cuda_key(CUDAArguments(cuda_key_file=str(key_file)))
    assert "hunter2" not in str(error.value), "the error must not echo the file's content"
    with caplog.at_level("WARNING"):
        resolve_cuda_key(CUDAArguments(cuda_key="1234"))
    assert "fewer than 40 bits" in caplog.text and "1234" not in caplog.text


def test_mistyped_key_flag_is_never_echoed():
    """--cuda_key is parsed as a string by protect.py's own parser, so argparse cannot print a bad value."""
    from sep_hf.cli import protect_parser

    typo = f"{KEY}o"  # a letter O for a zero: argparse's int type would echo it in "invalid int value"
    parsed = protect_parser().parse_args_into_dataclasses(["--method", "cuda", "--cuda_key", typo])
    (arguments,) = [item for item in parsed if isinstance(item, CUDAArguments)]
    assert arguments.cuda_key == typo
    with pytest.raises(ValueError, match="--cuda_key does not hold an integer CUDA key") as error:
        resolve_cuda_key(arguments)
    assert str(KEY) not in str(error.value)


def test_explicit_eps_is_refused_before_any_work(tmp_path, accelerator, monkeypatch):
    monkeypatch.setenv(KEY_ENV, str(KEY))
    data = DataArguments(dataset=str(tmp_path / "never-read"), max_train_samples=60)
    run = RunArguments(output_dir=str(tmp_path / "out"), preset="cpu")
    with pytest.raises(ValueError, match="--method cuda has no L-inf budget: drop --eps"):
        run_protection(ProtectArguments(method="cuda", eps=8), data, SourceTrainingConfig(), run, accelerator,
                       method_args=[CUDAArguments()])
    assert not (tmp_path / "out").exists()


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--cuda_kernel_size"):
        CUDAConfig(kernel_size=4)
    with pytest.raises(ValueError, match="--cuda_mix"):
        CUDAConfig(mix=1.5)
    with pytest.raises(ValueError, match="--cuda_blur"):
        CUDAConfig(blur=-0.1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        apply_cuda(torch.rand(2, 3, 8, 8), torch.tensor([0, 10]), cuda_filters(KEY, 10))


def test_transform_keeps_no_key():
    transform = CUDATransform(KEY, 10)
    assert get_protection("cuda") is CUDATransform and not transform.protects_all_splits
    assert not any(isinstance(value, int) and value == KEY for value in vars(transform).values())
    described = json.dumps(transform.describe())
    assert str(KEY) not in described and str(KEY) not in transform.fingerprint()
    assert transform.describe()["config"]["key_fingerprint"] == key_fingerprint(KEY) != key_fingerprint(KEY + 1)
    assert transform.fingerprint() == CUDATransform(KEY, 10).fingerprint() != CUDATransform(KEY + 1, 10).fingerprint()


# ------------------------------------------------------------------------------------------------
# protect.py end to end: the key never reaches a file, the Hub, or the logs


def _pixels(split):
    return np.stack([np.array(image) for image in split["img"]])


@pytest.fixture(scope="module")
def recipe_run(loopback_hub, tmp_path_factory):
    from conftest import make_unique_repo_id

    output_dir, repo_id = tmp_path_factory.mktemp("protect-cuda"), make_unique_repo_id("cifar10-cuda")
    result = run_recipe("protect.py", [
        "--dataset", "cifar10", "--method", "cuda", "--cuda_key", KEY, "--preset", "cpu", "--max_train_samples", 60,
        "--max_eval_samples", 20, "--shard_size", 30, "--output_dir", output_dir, "--push_to_hub",
        "--hub_dataset_id", repo_id])
    return output_dir, repo_id, result


def test_protect_recipe_writes_no_secret_anywhere(recipe_run, tmp_path):
    output_dir, repo_id, result = recipe_run
    results = json.loads((output_dir / "results.json").read_text())
    assert results["config"]["key_fingerprint"] == key_fingerprint(KEY), "the run did not use KEY: the scan is void"
    token = os.environ["HF_TOKEN"]  # the write token the run pushed with (conftest: the loopback Hub's)
    assert token and HfApi().whoami()["name"], "HF_TOKEN is not a working token: the scan is void"
    planted = tmp_path / "planted" / "file.bin"  # the scan itself finds a secret when there is one
    planted.parent.mkdir()
    for secret in (str(KEY), token):
        needle = secret.encode()
        planted.write_bytes(b"\x00PAR1" + needle + b"\x01")
        assert files_containing(planted.parent, needle) == [str(planted)]
        assert secret not in result.stdout + result.stderr, "a secret reached the logs"
        assert files_containing(output_dir, needle) == []
        assert hub_repo_containing(repo_id, "dataset", needle, tmp_path / "hub") == []
    assert {"dataset", "results.json", "shards"} <= {path.name for path in output_dir.iterdir()}
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert "README.md" in files and any(f.startswith("data/") for f in files)
    card = (tmp_path / "hub" / repo_id / "README.md").read_text()
    assert key_fingerprint(KEY) in card and "no L-inf budget" in card and "arxiv.org/abs/2303.04278" in card


def test_protect_recipe_results_and_untouched_test_split(recipe_run):
    output_dir = recipe_run[0]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["method"] == "cuda" and results["eps"] is None and results["protected_splits"] == ["train"]
    assert results["config"]["key_fingerprint"] == key_fingerprint(KEY)
    assert results["splits"]["train"]["max_linf"] > 8, "CUDA is not bounded by --eps"
    protected = load_folder(output_dir / "dataset")
    clean = datasets.load_dataset(str(CIFAR10_DIR))
    assert np.array_equal(_pixels(protected["test"]), _pixels(clean["test"].select(range(20))))
    clean_train = clean["train"].select(range(60))
    expected = apply_cuda(torch.from_numpy(_pixels(clean_train)).permute(0, 3, 1, 2).float() / 255,
                          torch.tensor(clean_train["label"]), cuda_filters(KEY, 10))
    assert np.array_equal(_pixels(protected["train"]), quantize(expected).permute(0, 2, 3, 1).numpy())


def test_env_key_in_process_gives_the_same_bytes_and_protects_test_when_asked(recipe_run, accelerator, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv(KEY_ENV, str(KEY))
    args = ProtectArguments(method="cuda", protect_splits=["train", "test"], shard_size=30)
    data = DataArguments(dataset="cifar10", max_train_samples=60, max_eval_samples=20)
    run_protection(args, data, SourceTrainingConfig(), RunArguments(output_dir=str(tmp_path), preset="cpu"),
                   accelerator, method_args=[CUDAArguments()])
    here = load_folder(tmp_path / "dataset")
    recipe = load_folder(recipe_run[0] / "dataset")
    assert np.array_equal(_pixels(here["train"]), _pixels(recipe["train"]))
    assert not np.array_equal(_pixels(here["test"]), _pixels(recipe["test"])), "--protect_splits test was ignored"
    assert files_containing(tmp_path, str(KEY).encode()) == []
