"""What the jobs leave on the Hub: a dataset repo keeps the visibility its owner gave it and loses its
unprotected past only when asked, pushed cards and records name datasets by public names, a token that
cannot write fails before any training, and a run that fails (the Hub unreachable, or gone mid-upload)
ends in one line and leaves nothing public."""
from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import datasets
import huggingface_hub.constants
import huggingface_hub.utils._http as hf_http
import numpy as np
import pytest
from conftest import files_containing, hub_repo_containing, make_unique_repo_id
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image

from sep_hf import cli
from sep_hf.arguments import HubArguments, RunArguments
from sep_hf.data.view import DataArguments
from sep_hf.protect import job as protect_job
from sep_hf.protect.job import ProtectArguments, run_protection
from sep_hf.protect.methods.sep import SEPArguments
from sep_hf.publish.hub import HubError
from sep_hf.source import job as source_job
from sep_hf.source.job import run_source_training
from sep_hf.source.recipe import SourceTrainingConfig
from sep_hf.testing.hub import LoopbackHub
from sep_hf.victim import job as victim_job
from sep_hf.victim.job import VictimArguments, run_victim
from sep_hf.victim.trainer import VictimTrainingConfig

NUM_TRAIN, NUM_TEST = 20, 5


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]  # the tiny run's


def _owner_split(num_rows: int, seed: int) -> datasets.Dataset:
    """Seeded random 32x32 RGB images with CIFAR-10's ten classes: what the tiny source run can protect."""
    pixels = np.random.default_rng(seed).integers(0, 256, (num_rows, 32, 32, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"img": [Image.fromarray(image) for image in pixels],
                                       "label": [row % len(CLASSES) for row in range(num_rows)]}, features=features)


def _owner_splits() -> datasets.DatasetDict:
    return datasets.DatasetDict({"train": _owner_split(NUM_TRAIN, seed=0), "test": _owner_split(NUM_TEST, seed=1)})


def _push_owner_dataset(repo_id: str, private: bool) -> str:
    """An owner's dataset on the Hub; returns the sha of its originals."""
    _owner_splits().push_to_hub(repo_id, private=private)
    return HfApi().repo_info(repo_id, repo_type="dataset").sha


def _owner_folder(folder):
    """An owner's dataset as a local Hub-layout folder (data/<split>-00000-of-00001.parquet)."""
    (folder / "data").mkdir(parents=True)
    for name, split in _owner_splits().items():
        split.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    return folder


def _protect(checkpoints, output_dir, accelerator, dataset: str, **protect):
    """One SEP step on 2 checkpoints of the tiny source run, at most 20 train / 10 test images."""
    return run_protection(ProtectArguments(method="sep", **protect),
                          DataArguments(dataset=dataset, max_train_samples=NUM_TRAIN, max_eval_samples=10),
                          SourceTrainingConfig(), RunArguments(output_dir=str(output_dir), preset="cpu"), accelerator,
                          [SEPArguments(steps=1, checkpoints=str(checkpoints), num_models=2)])


def _private(repo_id: str, repo_type: str = "dataset") -> bool:
    return HfApi().repo_info(repo_id, repo_type=repo_type).private


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries a failed request 5 times over 23 s: the same failures, without the waits."""
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None))


class _Crafting(Exception):
    """Raised where crafting would start: what a test sees before it happened."""


@pytest.fixture
def no_crafting(monkeypatch):
    def crafting(*args, **kwargs):
        raise _Crafting
    monkeypatch.setattr(protect_job, "protect_split", crafting)


# --------------------------------------------------------------------------------------------
# a dataset protected in place keeps its visibility; its unprotected past goes only when asked


def test_private_dataset_protected_in_place_stays_private(loopback_hub, unique_repo_id, tiny_source_run, tmp_path,
                                                          accelerator):
    repo_id = unique_repo_id("owner-private")
    originals = _push_owner_dataset(repo_id, private=True)
    _protect(tiny_source_run, tmp_path, accelerator, repo_id, push_to_hub=True, hub_dataset_id=repo_id)
    assert _private(repo_id) is True, "the owner's private dataset was made public"
    with pytest.raises(RepositoryNotFoundError):  # neither the protected data nor the originals load without a token
        HfApi().repo_info(repo_id, repo_type="dataset", revision=originals, token=False)


def test_protecting_a_repo_with_history_warns_before_crafting(loopback_hub, unique_repo_id, tiny_source_run,
                                                              tmp_path, accelerator, caplog, no_crafting):
    repo_id = unique_repo_id("owner-history")
    _push_owner_dataset(repo_id, private=False)
    with caplog.at_level("WARNING", logger="sep_hf"), pytest.raises(_Crafting):
        _protect(tiny_source_run, tmp_path, accelerator, repo_id, push_to_hub=True, hub_dataset_id=repo_id)
    warning = caplog.text
    assert repo_id in warning and "unprotected originals" in warning
    assert "--hub_squash_history" in warning and "--hub_dataset_id" in warning


def test_squashed_history_leaves_only_the_protected_revision(loopback_hub, unique_repo_id, tiny_source_run,
                                                             tmp_path, accelerator):
    repo_id = unique_repo_id("owner-squash")
    originals = _push_owner_dataset(repo_id, private=False)
    results = _protect(tiny_source_run, tmp_path, accelerator, repo_id, push_to_hub=True, hub_dataset_id=repo_id,
                       hub_squash_history=True)
    api = HfApi()
    commits = api.list_repo_commits(repo_id, repo_type="dataset")
    assert [commit.commit_id for commit in commits] == [results["hub_revision"]]
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo_id, repo_type="dataset", revision=originals)
    assert _private(repo_id) is False  # public before, public after: only the history went


def test_squash_history_needs_a_push():
    with pytest.raises(ValueError, match="--hub_squash_history needs --push_to_hub"):
        ProtectArguments(hub_squash_history=True)


def test_visibility_flag_is_none_unless_given():
    parser = cli.protect_parser()
    assert parser.parse_args_into_dataclasses(args=[])[0].hub_private_dataset is None
    assert parser.parse_args_into_dataclasses(args=["--hub_private_dataset"])[0].hub_private_dataset is True
    assert parser.parse_args_into_dataclasses(args=["--hub_private_dataset", "false"])[0].hub_private_dataset is False


# --------------------------------------------------------------------------------------------
# the source repo names a local dataset by its folder name only


def test_pushed_source_run_names_a_local_dataset_by_its_folder_name(loopback_hub, unique_repo_id, tmp_path,
                                                                    accelerator):
    repo_id, photos = unique_repo_id("source-public-names"), _owner_folder(tmp_path / "owner-photos")
    config = SourceTrainingConfig(epochs=2, num_checkpoints=2, batch_size=10, seed=0)
    results = run_source_training(config, DataArguments(dataset=str(photos)),
                                  RunArguments(output_dir=str(tmp_path / "run"), preset="cpu"),
                                  HubArguments(push_to_hub=True, hub_model_id=repo_id), accelerator)
    assert results["dataset"] == "owner-photos"
    for local in {str(photos), str(photos.resolve())}:
        assert files_containing(tmp_path / "run", local.encode()) == []
        assert hub_repo_containing(repo_id, "model", local.encode(), tmp_path / "download") == []
    record = json.loads(next((tmp_path / "run" / "checkpoints").glob("epoch-*/record.json")).read_text())
    assert record["dataset"]["id"] == "owner-photos"


# --------------------------------------------------------------------------------------------
# write access is checked before any training


class _Trained(Exception):
    """Raised where training would start."""


def _refuse_training(*args, **kwargs):
    raise _Trained


@pytest.fixture
def read_only_token(loopback_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", loopback_hub.read_token)


def _victim(output_dir, dataset: str, hub: HubArguments, update_dataset_card: bool = False):
    return run_victim(VictimTrainingConfig(model="smallnet_cifar", epochs=1, batch_size=10),
                      DataArguments(dataset=dataset, max_train_samples=NUM_TRAIN, max_eval_samples=NUM_TEST),
                      RunArguments(output_dir=str(output_dir), preset="cpu"), hub,
                      VictimArguments(update_dataset_card=update_dataset_card))


def test_victim_push_into_an_existing_repo_with_a_read_token_fails_before_training(
        loopback_hub, unique_repo_id, tmp_path, monkeypatch):
    repo_id = unique_repo_id("victim-existing")
    HfApi().create_repo(repo_id, private=True)
    monkeypatch.setattr(victim_job, "train_victim", _refuse_training)
    monkeypatch.setenv("HF_TOKEN", loopback_hub.read_token)
    with pytest.raises(HubError, match=f"cannot write model repo '{repo_id}': it is a read-only token"):
        _victim(tmp_path, str(_owner_folder(tmp_path / "photos")), HubArguments(push_to_hub=True, hub_model_id=repo_id))


def test_victim_dataset_card_update_with_a_read_token_fails_before_training(
        loopback_hub, unique_repo_id, tmp_path, monkeypatch):
    repo_id = unique_repo_id("victim-card")
    _push_owner_dataset(repo_id, private=False)
    monkeypatch.setattr(victim_job, "train_victim", _refuse_training)
    monkeypatch.setenv("HF_TOKEN", loopback_hub.read_token)
    with pytest.raises(HubError, match=f"cannot write dataset repo '{repo_id}': it is a read-only token"):
        _victim(tmp_path, repo_id, HubArguments(), update_dataset_card=True)


def test_source_push_into_an_existing_repo_with_a_read_token_fails_before_training(
        loopback_hub, unique_repo_id, tmp_path, accelerator, monkeypatch):
    repo_id = unique_repo_id("source-existing")
    HfApi().create_repo(repo_id, private=True)
    monkeypatch.setattr(source_job, "train_source", _refuse_training)
    monkeypatch.setenv("HF_TOKEN", loopback_hub.read_token)
    with pytest.raises(HubError, match=f"cannot write model repo '{repo_id}': it is a read-only token"):
        run_source_training(SourceTrainingConfig(epochs=1, batch_size=10),
                            DataArguments(dataset=str(_owner_folder(tmp_path / "photos"))),
                            RunArguments(output_dir=str(tmp_path / "run"), preset="cpu"),
                            HubArguments(push_to_hub=True, hub_model_id=repo_id), accelerator)


# --------------------------------------------------------------------------------------------
# the Hub unreachable, or gone mid-upload: one line, nothing public


def test_unreachable_hub_is_one_line_before_compute(tiny_source_run, tmp_path, accelerator, monkeypatch, capsys,
                                                    no_crafting):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(cli, "_accelerator", lambda run_args: accelerator)
    argv = ["--dataset", _owner_folder(tmp_path / "photos"), "--method", "sep", "--steps", 1, "--checkpoints", tiny_source_run, "--num_models", 2, "--preset", "cpu",
            "--output_dir", tmp_path / "run", "--push_to_hub", "--hub_dataset_id", make_unique_repo_id("unreachable")]
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(cli.protect, list(map(str, argv)))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and f"The Hub at {endpoint} cannot be reached" in err[0]


@pytest.fixture
def hub_going_away(tmp_path, monkeypatch, no_backoff):
    """A loopback Hub of this test's own, that can go away mid-upload (``hub.go_away_at(route)``)."""
    with LoopbackHub(tmp_path / "hub-root") as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        yield hub


def test_hub_gone_mid_upload_is_one_line_and_leaves_nothing_public(hub_going_away, tiny_source_run, tmp_path,
                                                                  accelerator):
    repo_id = make_unique_repo_id("gone-mid-upload")
    hub_going_away.go_away_at("commit")  # the data reached the Hub; the commit that publishes it does not
    with pytest.raises(HubError) as caught:
        _protect(tiny_source_run, tmp_path / "run", accelerator, str(_owner_folder(tmp_path / "photos")), push_to_hub=True,
                 hub_dataset_id=repo_id)
    assert "\n" not in str(caught.value) and "cannot be reached" in str(caught.value)
    hub_going_away.go_away_at(None)  # back again: what did the failed run leave?
    api = HfApi()
    if api.repo_exists(repo_id, repo_type="dataset"):
        assert _private(repo_id) is True
        assert api.list_repo_files(repo_id, repo_type="dataset") == [".gitattributes"]
    assert (tmp_path / "run" / "dataset" / "README.md").is_file()  # the local copy is kept, ready to push again
