"""The loopback Hub (sep_hf.testing.hub) driven by the real huggingface_hub and datasets clients."""
from __future__ import annotations

import json
import re

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
from conftest import CIFAR10_DIR, CIFAR10_REPO_ID
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    DatasetCard,
    DatasetCardData,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError
from PIL import Image
from safetensors.torch import load_file, save_file

from sep_hf.testing.hub import LoopbackHub

CIFAR10_TEST_SHARD = "data/test-00000-of-00001.parquet"


def test_load_dataset_cifar10_from_mounted_folder(loopback_hub):
    ds = datasets.load_dataset(CIFAR10_REPO_ID)
    mounted = {split: sum(pq.ParquetFile(path).metadata.num_rows for path in (CIFAR10_DIR / "data").glob(f"{split}-*"))
               for split in ("train", "test")}  # 50,000 / 10,000 from ../shared, the stand-in's without it
    assert {name: split.num_rows for name, split in ds.items()} == mounted and mounted["test"] > 0
    features = ds["train"].features
    assert isinstance(features["img"], datasets.Image)
    assert isinstance(features["label"], datasets.ClassLabel)
    assert features["label"].names[:2] == ["airplane", "automobile"] and features["label"].num_classes == 10
    assert ds["test"][0]["img"].size == (32, 32)


def _image_dataset(tmp_path, pixels: np.ndarray, tag: str) -> datasets.Dataset:
    paths = []
    for i, array in enumerate(pixels):
        paths.append(str(tmp_path / f"{tag}-{i}.png"))
        Image.fromarray(array).save(paths[-1])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": paths, "label": list(range(len(paths)))}, features=features)


def _pixels(ds: datasets.Dataset) -> np.ndarray:
    return np.stack([np.asarray(row["image"]) for row in ds])


def test_push_image_dataset_twice_and_load_both_revisions(loopback_hub, unique_repo_id, tmp_path):
    repo_id = unique_repo_id("images")
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, size=(2, 6, 8, 8, 3), dtype=np.uint8))

    def push(pixels, tag):
        dd = datasets.DatasetDict({"train": _image_dataset(tmp_path, pixels[:4], f"{tag}-train"),
                                   "test": _image_dataset(tmp_path, pixels[4:], f"{tag}-test")})
        dd.push_to_hub(repo_id)
        return HfApi().dataset_info(repo_id).sha

    first_sha = push(first, "a")
    loaded = datasets.load_dataset(repo_id)
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    np.testing.assert_array_equal(_pixels(loaded["train"]), first[:4])
    np.testing.assert_array_equal(_pixels(loaded["test"]), first[4:])

    second_sha = push(second, "b")
    assert second_sha != first_sha
    np.testing.assert_array_equal(_pixels(datasets.load_dataset(repo_id, split="train")), second[:4])
    old = datasets.load_dataset(repo_id, split="test", revision=first_sha)
    np.testing.assert_array_equal(_pixels(old), first[4:])


def test_private_model_upload_folder_and_access_rules(loopback_hub, unique_repo_id, tmp_path):
    api, repo_id = HfApi(), unique_repo_id("private-model")
    api.create_repo(repo_id, private=True)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tensors = {"weight": torch.randn(16, 8), "bias": torch.arange(8, dtype=torch.float32)}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"hidden": 8}))
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="checkpoint")

    local = snapshot_download(repo_id, cache_dir=tmp_path / "cache")
    restored = load_file(f"{local}/model.safetensors")
    assert restored.keys() == tensors.keys() and all(torch.equal(restored[k], tensors[k]) for k in tensors)
    assert json.loads(open(f"{local}/config.json").read()) == {"hidden": 8}

    info = api.model_info(repo_id, files_metadata=True)
    assert info.private is True
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["model.safetensors"] is not None and lfs["config.json"] is None
    assert api.model_info(repo_id, token=loopback_hub.read_token).sha == info.sha
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id, token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "config.json", token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(HfHubHTTPError, match="write access") as excinfo:
        api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo="copy",
                          token=loopback_hub.read_token)
    assert excinfo.value.response.status_code == 403


def test_branch_with_slash_and_cards(loopback_hub, unique_repo_id, tmp_path):
    api, repo_id = HfApi(), unique_repo_id("cards")
    api.create_repo(repo_id)
    api.create_branch(repo_id, branch="exp/v1")
    api.upload_file(path_or_fileobj=b"on the branch", path_in_repo="notes/b.txt", repo_id=repo_id,
                    revision="exp/v1")
    path = hf_hub_download(repo_id, "notes/b.txt", revision="exp/v1", cache_dir=tmp_path)
    assert open(path, "rb").read() == b"on the branch"
    with pytest.raises(RemoteEntryNotFoundError):  # needs X-Error-Code: EntryNotFound
        hf_hub_download(repo_id, "notes/b.txt", revision="main", cache_dir=tmp_path)
    assert "exp/v1" in {b.name for b in api.list_repo_refs(repo_id).branches}

    data = ModelCardData(license="mit", model_name="tiny-net", eval_results=[EvalResult(
        task_type="image-classification", dataset_type=CIFAR10_REPO_ID, dataset_name="CIFAR-10",
        dataset_split="test", metric_type="accuracy", metric_value=0.42)])
    ModelCard(f"---\n{data.to_yaml()}\n---\n# tiny-net\n").push_to_hub(repo_id)
    card = ModelCard.load(repo_id)
    assert card.data.model_name == "tiny-net"
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("accuracy", 0.42)]

    ds_repo = unique_repo_id("card-ds")
    api.create_repo(ds_repo, repo_type="dataset")
    card_data = DatasetCardData(license="mit", pretty_name="Tiny set")
    DatasetCard(f"---\n{card_data.to_yaml()}\n---\n# Tiny set\n").push_to_hub(ds_repo)
    assert DatasetCard.load(ds_repo).data.pretty_name == "Tiny set"


def test_commit_semantics_pr_parent_and_listings(loopback_hub, unique_repo_id):
    api, repo_id = HfApi(), unique_repo_id("commits")
    api.create_repo(repo_id, exist_ok=True)
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id  # 409 with url is swallowed
    base = api.create_commit(repo_id, [CommitOperationAdd("a/x.txt", b"x"), CommitOperationAdd("a/b/y.bin", b"\0y")],
                             commit_message="add")
    pr = api.create_commit(repo_id, [CommitOperationDelete("a/x.txt")], commit_message="rm", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert api.list_repo_files(repo_id) == [".gitattributes", "a/b/y.bin", "a/x.txt"]
    assert api.list_repo_files(repo_id, revision="refs/pr/1") == [".gitattributes", "a/b/y.bin"]
    names = [(e.path, type(e).__name__) for e in api.list_repo_tree(repo_id, path_in_repo="a")]
    assert names == [("a/b", "RepoFolder"), ("a/x.txt", "RepoFile")]
    info = {e.path: e for e in api.get_paths_info(repo_id, ["a/b/y.bin", "a/b", "missing"])}
    assert set(info) == {"a/b/y.bin", "a/b"} and info["a/b/y.bin"].lfs.size == 2
    api.upload_file(path_or_fileobj=b"z", path_in_repo="z.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as excinfo:  # main moved on since `base`
        api.create_commit(repo_id, [CommitOperationAdd("w.txt", b"w")], commit_message="late",
                          parent_commit=base.oid)
    assert excinfo.value.response.status_code == 412
    assert [c.title for c in api.list_repo_commits(repo_id)] == ["Upload z.txt with huggingface_hub", "add",
                                                                 "initial commit"]
    with pytest.raises(HfHubHTTPError, match="read-only") as excinfo:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=CIFAR10_REPO_ID, repo_type="dataset")
    assert excinfo.value.response.status_code == 403


def test_restart_on_same_root_keeps_repos_commits_and_files(tmp_path):
    root, repo_id = tmp_path / "hub", "org/persistent"
    payload = bytes(range(256)) * 64

    def fetch(url, filename, revision, cache):
        return open(hf_hub_download(repo_id, filename, revision=revision, endpoint=url,
                                    cache_dir=tmp_path / cache), "rb").read()

    with LoopbackHub(root) as hub:
        api = HfApi(endpoint=hub.url)
        api.create_repo(repo_id)
        old = api.upload_file(path_or_fileobj=b"version 1", path_in_repo="notes.txt", repo_id=repo_id)
        api.upload_file(path_or_fileobj=payload, path_in_repo="weights.bin", repo_id=repo_id)
        api.upload_file(path_or_fileobj=b"version 2", path_in_repo="notes.txt", repo_id=repo_id)
        before = (fetch(hub.url, "notes.txt", old.oid, "c1"), fetch(hub.url, "notes.txt", "main", "c2"),
                  fetch(hub.url, "weights.bin", "main", "c3"))
    with LoopbackHub(root) as hub:  # a fresh server (new port) that only knows what is on disk
        after = (fetch(hub.url, "notes.txt", old.oid, "d1"), fetch(hub.url, "notes.txt", "main", "d2"),
                 fetch(hub.url, "weights.bin", "main", "d3"))
        assert len(HfApi(endpoint=hub.url).list_repo_commits(repo_id)) == 4
    assert before == after == (b"version 1", b"version 2", payload)


def test_resolve_range_requests(loopback_hub):
    url = f"{loopback_hub.url}/datasets/{CIFAR10_REPO_ID}/resolve/main/{CIFAR10_TEST_SHARD}"
    local = (CIFAR10_DIR / CIFAR10_TEST_SHARD).read_bytes()
    head = requests.head(url, timeout=10)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(local)
    assert re.fullmatch(r"[0-9a-f]{40}", head.headers["X-Repo-Commit"])
    assert head.headers["X-Linked-Etag"] == head.headers["ETag"] and int(head.headers["X-Linked-Size"]) == len(local)
    for spec, expected in [("bytes=0-3", local[:4]), ("bytes=1000-1999", local[1000:2000]),
                           ("bytes=-4", local[-4:]), (f"bytes={len(local) - 10}-", local[-10:])]:
        r = requests.get(url, headers={"Range": spec}, timeout=10)
        assert r.status_code == 206, spec
        assert r.content == expected, spec
        assert r.headers["Content-Range"].endswith(f"/{len(local)}")
    assert requests.get(url, headers={"Range": f"bytes={len(local)}-"}, timeout=10).status_code == 416
    assert requests.get(url, timeout=10).content == local
