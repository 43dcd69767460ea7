"""Source training at CPU scale: accuracy and wall time of `train_source.py --preset cpu`.

    python bench/source_cpu.py [--dataset ../shared/data/cifar10]

Targets (issue 3): clean test accuracy >= 78% on the first 2,000 test images after training on the
first 10,000 images, whole run <= 8 minutes on 2 CPU cores. The run folder (bench/runs/source-cpu)
is reused by the crafting benchmarks.
"""

import argparse
import shutil

from common import RUNS_DIR, SHARED_CIFAR10, launch, markdown_table, read_json, write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    parser.add_argument("--output_dir", default=str(RUNS_DIR / "source-cpu"))
    args = parser.parse_args()

    shutil.rmtree(args.output_dir, ignore_errors=True)  # measure a fresh run, not a resume
    recipe_args = ["--dataset", args.dataset, "--preset", "cpu", "--output_dir", args.output_dir]
    wall = launch("train_source.py", recipe_args, log=RUNS_DIR / "source-cpu.log")
    results = read_json(f"{args.output_dir}/results.json")
    rows = [[results["training_config"]["model"], results["num_train"], results["num_eval"],
             results["training_config"]["epochs"], results["checkpoints"],
             f"{results['clean_test_accuracy']:.4f}", f"{results['train_seconds']:.0f}", f"{wall:.0f}"]]
    table = markdown_table(["model", "train images", "test images", "epochs", "checkpoints", "clean test accuracy",
                            "train s", "wall s (whole command)"], rows)
    write_results("source_cpu", {
        "command": "accelerate launch --cpu recipes/train_source.py " + " ".join(recipe_args),
        "clean_test_accuracy": results["clean_test_accuracy"], "train_seconds": results["train_seconds"],
        "wall_seconds": wall, "checkpoints": results["checkpoints"],
        "checkpoint_accuracy": results["checkpoint_accuracy"],
        "targets": {"clean_test_accuracy": 0.78, "wall_seconds": 480},
        "met": {"accuracy": results["clean_test_accuracy"] >= 0.78, "time": wall <= 480},
    }, table)


if __name__ == "__main__":
    main()
