"""bench/paper_scale.py --tiny: the paper-scale pipeline (source, SEP-FA-VR, victim) end to end on CPU."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_paper_scale_tiny_runs_every_stage(tmp_path):
    command = [sys.executable, "bench/paper_scale.py", "--tiny", "--runs_dir", str(tmp_path / "runs"),
               "--results_dir", str(tmp_path / "results")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(next((tmp_path / "results").glob("paper_scale_tiny_cpu*.json")).read_text())
    source, craft, victim = record["source"], record["craft"]["eps8"], record["victim"]["eps8"]
    assert source["epochs"] == 2 and len(source["checkpoints"]) == 2 and 0 <= source["clean_test_accuracy"] <= 1
    # 2 steps of 1/255 from the clean image: every pixel within 2/255, and the crafting moved some by that much
    assert craft["images"] == 256 and craft["max_linf"] == 2
    assert craft["gradient_evaluations_per_image"] == 2 * (2 + 2)
    assert craft["gflop_per_gradient_evaluation"] > 0.5  # ResNet-18 at 32 px: 0.56 GFLOP forward alone
    assert 0 < craft["fraction_of_conv_peak"] and craft["img_per_s"] > 0
    assert 0 <= victim["eval_accuracy"] <= 1 and victim["epochs"] == 1
    # a second run reuses every stage
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads(next((tmp_path / "results").glob("paper_scale_tiny_cpu*.json")).read_text())["craft"]["eps8"][
        "seconds"] == craft["seconds"]
