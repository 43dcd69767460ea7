"""The user's whole job at CPU scale, through a loopback Hub: protect.py --preset cpu, then victims.

    python bench/end_to_end_cpu.py [--other_model resnet10t]

1. `protect.py --dataset cifar10 --preset cpu --push_to_hub --hub_dataset_id bench/cifar10-sep`
   (trains the source, pushes its checkpoints, crafts SEP-FA-VR over train 10k + test 2k, publishes);
2. `train_victim.py` on the published dataset and on clean cifar10, for the small net and one other
   timm model, each evaluated on the first 2,000 clean test images and pushed with its card.
Targets (issue 5): protected small-net victim <= 20%, clean >= 78%, total wall time <= 45 minutes.
The loopback Hub (sep_hf.testing.hub) stands in for huggingface.co; cifar10 is served from
../shared/data/cifar10 as uoft-cs/cifar10.
"""

import argparse
import json
import shutil

from common import RUNS_DIR, SHARED_CIFAR10, launch, markdown_table, read_json, write_results

from sep_hf.testing.hub import LoopbackHub


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other_model", default="resnet10t")
    parser.add_argument("--fresh", action="store_true", help="Delete earlier runs of this benchmark first.")
    args = parser.parse_args()
    work = RUNS_DIR / "end-to-end"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    with LoopbackHub(work / "hub", datasets={"uoft-cs/cifar10": str(SHARED_CIFAR10)}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(work / "hf-home"),
               "HF_TOKEN": "bench", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost"}
        stages, commands = {}, []

        def run(name, recipe, recipe_args, output_dir):
            commands.append(f"accelerate launch --cpu recipes/{recipe} " + " ".join(map(str, recipe_args)))
            if (output_dir / "results.json").exists():
                stages[name] = read_json(output_dir / "results.json").get("bench_wall_seconds")
            else:
                stages[name] = launch(recipe, recipe_args, env=env, log=work / f"{name}.log")
                payload = read_json(output_dir / "results.json")
                payload["bench_wall_seconds"] = stages[name]
                (output_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str))
            return read_json(output_dir / "results.json")

        protect_dir = work / "protect"
        protection = run("protect", "protect.py", ["--dataset", "cifar10", "--preset", "cpu", "--push_to_hub",
                                                   "--hub_dataset_id", "bench/cifar10-sep", "--output_dir", protect_dir],
                         protect_dir)
        victims = {}
        for model in ("smallnet_cifar", args.other_model):
            for data, dataset in (("clean", "cifar10"), ("protected", "bench/cifar10-sep")):  # clean first: the
                # protected victim's card then carries the clean reference accuracy
                output_dir = work / f"victim-{data}-{model}"
                extra = ["--update_dataset_card"] if data == "protected" else []
                if data == "protected" and f"clean-{model}" in victims:
                    extra += ["--clean_reference_accuracy", f"{victims[f'clean-{model}']['eval_accuracy']:.4f}"]
                victims[f"{data}-{model}"] = run(
                    f"victim-{data}-{model}", "train_victim.py",
                    ["--dataset", dataset, "--eval_dataset", "cifar10", "--model", model, "--preset", "cpu",
                     "--push_to_hub", "--hub_model_id", f"bench/cifar10-{data}-victim-{model.replace('_', '-')}",
                     *extra, "--output_dir", output_dir], output_dir)

    rows = [["protect.py (source + SEP-FA-VR + publish)", "-", "-", f"{stages['protect']:.0f}"]]
    for key, result in victims.items():
        data, model = key.split("-", 1)
        rows.append([f"train_victim.py {model}", data, f"{result['eval_accuracy']:.4f}", f"{stages[f'victim-{key}']:.0f}"])
    total = sum(stages.values())
    table = markdown_table(["stage", "training data", "clean test accuracy", "wall s"], rows)
    table += f"\n\nTotal wall time: {total / 60:.1f} min. Protection stages: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in protection["wall_seconds"].items())
    small_protected = victims["protected-smallnet_cifar"]["eval_accuracy"]
    small_clean = victims["clean-smallnet_cifar"]["eval_accuracy"]
    write_results("end_to_end_cpu", {
        "commands": commands, "stage_wall_seconds": stages, "protection": {
            k: protection[k] for k in ("method", "eps", "steps", "counts", "max_linf", "mean_psnr", "wall_seconds")},
        "victims": {k: {"eval_accuracy": v["eval_accuracy"], "train_seconds": v["train_seconds"]} for k, v in victims.items()},
        "total_wall_seconds": total,
        "targets": {"protected_max": 0.20, "clean_min": 0.78, "total_wall_seconds": 2700},
        "met": {"protected": small_protected <= 0.20, "clean": small_clean >= 0.78, "time": total <= 2700},
    }, table)


if __name__ == "__main__":
    main()
