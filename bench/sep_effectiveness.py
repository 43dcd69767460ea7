"""SEP effectiveness at CPU scale: victim accuracy after training on SEP / SEP-FA / SEP-FA-VR data.

    python bench/source_cpu.py            # first: the K=6 checkpoints in bench/runs/source-cpu
    python bench/sep_effectiveness.py [--methods sep sep-fa sep-fa-vr] [--eps 8] [--equal_compute]

First 10,000 CIFAR-10 training images protected with the `cpu` source run's 6 checkpoints, T=10
steps of 1/255, eps 8/255; a victim (small net, the same recipe as the source, transformers
Trainer) is trained on them and evaluated on the first 2,000 clean test images, next to a victim
trained on the clean images. Target (issue 4): every variant <= 20% while clean >= 78%.
Finished runs are reused (delete bench/runs/<name> to redo one). ``--equal_compute`` compares the
variants at equal cost, as the paper does: SEP-FA-VR with K/2 checkpoints + K/2 inner steps (T K
gradient evaluations per image, like SEP and SEP-FA with K checkpoints).
"""

import argparse
from pathlib import Path

from common import RUNS_DIR, SHARED_CIFAR10, launch, markdown_table, read_json, write_results

from sep_hf.protect import get_protection
from sep_hf.protect.methods.sep import SEPArguments


def protect(method: str, eps: float, checkpoints: str, dataset: str, step_size: float | None = None,
            flags: dict | None = None, name: str | None = None) -> tuple[Path, dict]:
    """Protect the training split at CPU scale (step size: the cpu preset's unless given; ``flags``: more
    protect.py flags, with ``name`` for the run folder)."""
    suffix = "" if step_size is None else f"-alpha{step_size:g}"
    output_dir = RUNS_DIR / f"protect-{name or method}-eps{eps:g}{suffix}"
    if not (output_dir / "results.json").exists():
        alpha = [] if step_size is None else ["--step_size", step_size]
        budget = ["--eps", eps] if get_protection(method).has_budget else []  # CUDA has none
        extra = [item for flag, value in (flags or {}).items() for item in (f"--{flag}", value)]
        # --checkpoints is a flag of the methods that craft with the self-ensemble (protect.py refuses it elsewhere)
        ensemble = ["--checkpoints", checkpoints] if SEPArguments in get_protection(method).argument_classes() else []
        launch("protect.py", ["--dataset", dataset, "--preset", "cpu", *ensemble, "--method", method,
                              *budget, *alpha, *extra, "--splits", "train", "--output_dir", output_dir],
               log=RUNS_DIR / f"{output_dir.name}.log")
    return output_dir / "dataset", read_json(output_dir / "results.json")


def victim(name: str, dataset, eval_dataset: str, model: str = "smallnet_cifar") -> dict:
    output_dir = RUNS_DIR / f"victim-{name}-{model}"
    if not (output_dir / "results.json").exists():
        launch("train_victim.py", ["--dataset", dataset, "--eval_dataset", eval_dataset, "--model", model,
                                   "--preset", "cpu", "--output_dir", output_dir], log=RUNS_DIR / f"{output_dir.name}.log")
    return read_json(output_dir / "results.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sep", "sep-fa", "sep-fa-vr"])
    parser.add_argument("--eps", type=float, default=8.0)
    parser.add_argument("--step_size", type=float, default=None, help="alpha in 1/255 units (default: the cpu preset's)")
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    parser.add_argument("--checkpoints", default=str(RUNS_DIR / "source-cpu"))
    parser.add_argument("--equal_compute", action="store_true", help="SEP-FA-VR with K/2 checkpoints + K/2 inner steps.")
    args = parser.parse_args()
    half = len(read_json(Path(args.checkpoints) / "results.json")["checkpoints"]) // 2

    clean = victim("clean", args.dataset, args.dataset)
    rows = [["clean", "-", "-", "-", "-", f"{clean['eval_accuracy']:.4f}", f"{clean['train_seconds']:.0f}"]]
    runs = {"clean": {"eval_accuracy": clean["eval_accuracy"], "victim_train_seconds": clean["train_seconds"]}}
    for method in args.methods:
        flags = {"num_models": half, "vr_steps": half} if args.equal_compute and method == "sep-fa-vr" else {}
        name = f"{method}-k{half}m{half}" if flags else method
        dataset, protection = protect(method, args.eps, args.checkpoints, args.dataset, args.step_size, flags=flags,
                                      name=name)
        suffix = "" if args.step_size is None else f"-alpha{args.step_size:g}"
        result = victim(f"{name}-eps{args.eps:g}{suffix}", dataset, args.dataset)
        craft = protection["wall_seconds"]["crafting"] + protection["wall_seconds"].get("preparation", protection["wall_seconds"].get("class_means", 0.0))
        count = protection["counts"]["train"]
        grads = protection.get("gradient_evaluations_per_image", "-")  # T K, or T (K + M) for SEP-FA-VR
        runs[name] = {"eval_accuracy": result["eval_accuracy"], "crafting_seconds": craft,
                        "gradient_evaluations_per_image": grads,
                        "images_per_second": count / craft, "max_linf": protection["max_linf"],
                        "mean_psnr": protection["mean_psnr"], "victim_train_seconds": result["train_seconds"],
                        "history": [row["eval_accuracy"] for row in result["history"]]}
        rows.append([name, protection["max_linf"], f"{protection['mean_psnr']:.1f}", grads, f"{craft:.0f}",
                     f"{result['eval_accuracy']:.4f}", f"{result['train_seconds']:.0f}"])
    table = markdown_table(["training data", "max L-inf (1/255)", "PSNR dB", "gradient evaluations / image",
                            "crafting s", "victim clean test acc",
                            "victim train s"], rows)
    protected = [run["eval_accuracy"] for name, run in runs.items() if name != "clean"]
    suffix = ("" if args.step_size is None else f"_alpha{args.step_size:g}") + ("_equal_compute" if args.equal_compute else "")
    write_results(f"sep_effectiveness_cpu_eps{args.eps:g}{suffix}", {
        "setup": {"train_images": 10_000, "test_images": 2_000, "source": "smallnet_cifar, preset cpu, K=6",
                  "steps": 10, "step_size": f"{args.step_size or 2:g}/255", "eps": f"{args.eps:g}/255", "victim": "smallnet_cifar, preset cpu, Trainer"},
        "commands": ["python bench/source_cpu.py", "python bench/sep_effectiveness.py " + " ".join(
            ["--methods", *args.methods, "--eps", f"{args.eps:g}"] + ([] if args.step_size is None else ["--step_size", f"{args.step_size:g}"])
            + (["--equal_compute"] if args.equal_compute else []))],
        "runs": runs,
        "targets": {"protected_max": 0.20, "clean_min": 0.78},
        "met": {"protected": all(a <= 0.20 for a in protected), "clean": clean["eval_accuracy"] >= 0.78},
    }, table)


if __name__ == "__main__":
    main()
