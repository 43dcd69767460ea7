"""CUDA, EM and REM at CPU scale: victim accuracy next to clean and SEP-FA-VR, crafting wall time, CUDA speed.

    export SEP_HF_CUDA_KEY=$(python -c 'import secrets; print(secrets.randbits(63))')  # else one is drawn
    python bench/other_protections_cpu.py [--methods cuda em rem]

    # smoke run (tiny, own folders): about a few minutes on 2 busy cores
    python bench/other_protections_cpu.py --max_train_samples 200 --max_eval_samples 100 --epochs 1 \
        --em_iterations 4 --rem_iterations 2 --runs_dir /tmp/other-smoke/runs --results_dir /tmp/other-smoke/results

First 10,000 CIFAR-10 training images protected by ``recipes/protect.py --preset cpu --splits train``
with ``--method cuda`` (model-free, private key), ``em`` and ``rem`` (eps 8/255; source model the
small net, the cpu preset's reduced schedule); a victim (small net, preset cpu, transformers
Trainer) trained on each and evaluated on the first 2,000 clean test images. The clean and SEP-FA-VR
rows are read from bench/sep_effectiveness.py's runs (bench/runs/victim-clean-smallnet_cifar,
victim-sep-fa-vr-eps8-smallnet_cifar, protect-sep-fa-vr-eps8) when present. Crafting time is
preparation (EM/REM: fitting the noise) + crafting, without publishing; SEP's excludes training its
source checkpoints. CUDA's own speed is also timed in-process on the 10k images: the batched
filter alone, and the whole ``Dataset.map`` function (PNG decode, filter, PNG encode).

Folders match bench/sep_effectiveness.py's and bench/protection_matrix.py's (protect-<method>-eps8,
victim-<method>-eps8-smallnet_cifar), so finished runs are shared and reused; delete one to redo it.
Writes bench/results/other_protections_cpu.{json,md}.
"""

import argparse
import secrets
import sys
import time
from pathlib import Path

import common
from common import SHARED_CIFAR10, launch, markdown_table, read_json, write_results

NAME = "other_protections_cpu"
MODEL = "smallnet_cifar"


def use_folders(runs_dir: str | None, results_dir: str | None) -> None:
    """Point this script and the shared writer at other folders (smoke runs must not be reused as real ones)."""
    if runs_dir:
        common.RUNS_DIR = Path(runs_dir).resolve()
    if results_dir:
        common.RESULTS_DIR = Path(results_dir).resolve()


def _sizes(args) -> list:
    flags = []
    for flag in ("max_train_samples", "max_eval_samples"):
        if getattr(args, flag):
            flags += [f"--{flag}", getattr(args, flag)]
    return flags


def protect(method: str, args) -> dict:
    """Protect the training split (reusing a finished run); returns its results.json."""
    output_dir = common.RUNS_DIR / f"protect-{method}-eps{args.eps:g}"
    if not (output_dir / "results.json").exists():
        flag = f"{method}_iterations"  # smoke runs only
        extra = [f"--{flag}", getattr(args, flag)] if getattr(args, flag, None) else []
        # CUDA reads its key from $SEP_HF_CUDA_KEY (inherited): never on a command line or in a log
        launch("protect.py", ["--dataset", args.dataset, "--preset", "cpu", "--method", method, "--eps", args.eps,
                              "--splits", "train", *_sizes(args), *extra, "--output_dir", output_dir],
               log=common.RUNS_DIR / f"{output_dir.name}.log")
    return read_json(output_dir / "results.json") | {"output_dir": str(output_dir)}


def victim(name: str, dataset: str, args) -> dict:
    output_dir = common.RUNS_DIR / f"victim-{name}-{MODEL}"
    if not (output_dir / "results.json").exists():
        epochs = ["--epochs", args.epochs] if args.epochs else []
        launch("train_victim.py", ["--dataset", dataset, "--eval_dataset", args.dataset, "--model", MODEL,
                                   "--preset", "cpu", *_sizes(args), *epochs, "--output_dir", output_dir],
               log=common.RUNS_DIR / f"{output_dir.name}.log")
    return read_json(output_dir / "results.json")


def crafting_seconds(protection: dict) -> float:
    wall = protection.get("wall_seconds", {})
    return sum(seconds for stage, seconds in wall.items() if stage not in ("publishing", "source_training"))


def time_cuda(args) -> dict:
    """In-process CUDA throughput on the first ``--cuda_timing_images`` training images (best of 3).

    Measured with torch's default threads and with one: when other jobs share the cores, two
    threads' barriers can stall small batches many times over, and one thread shows the kernel's speed.
    """
    import torch

    from sep_hf.data.images import tensor_to_png_images, uint8_to_float
    from sep_hf.data.view import DataArguments, load_training_data
    from sep_hf.protect.methods.cuda import CUDATransform, apply_cuda, cuda_filters

    data = load_training_data(DataArguments(dataset=args.dataset, max_train_samples=args.cuda_timing_images,
                                            max_eval_samples=1))
    images, labels = uint8_to_float(data.train_images), data.train_labels
    key = secrets.randbits(63)  # timing only: any key
    filters = cuda_filters(key, len(data.class_names))
    transform = CUDATransform(key, len(data.class_names))
    batch = {"img": tensor_to_png_images(data.train_images), "label": labels.tolist()}
    n, size = len(images), 250  # protect.py's default --craft_batch_size

    def best(run, repeats=3) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    default_threads, results = torch.get_num_threads(), {"images": n, "target_images_per_second": 5000}
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        results[f"threads_{threads}"] = {
            "filter_one_call": n / best(lambda: apply_cuda(images, labels, filters)),
            "filter_batches_of_250": n / best(lambda: [apply_cuda(images[i : i + size], labels[i : i + size], filters)
                                                       for i in range(0, n, size)]),
            "map_function_batches_of_250": n / best(lambda: [
                transform({k: v[i : i + size] for k, v in batch.items()}, list(range(i, min(i + size, n))))
                for i in range(0, n, size)], repeats=1),
        }
    torch.set_num_threads(default_threads)
    return results


def reference(name: str, protect_dir: str | None) -> dict | None:
    """A victim (and its protection) of bench/sep_effectiveness.py, if it was run."""
    victim_file = common.RUNS_DIR / f"victim-{name}-{MODEL}" / "results.json"
    if not victim_file.exists():
        return None
    row = {"eval_accuracy": read_json(victim_file)["eval_accuracy"], "victim_train_seconds": read_json(victim_file)["train_seconds"]}
    protect_file = common.RUNS_DIR / protect_dir / "results.json" if protect_dir else None
    if protect_file is not None and protect_file.exists():
        protection = read_json(protect_file)
        row.update(crafting_seconds=crafting_seconds(protection), max_linf=protection["max_linf"],
                   mean_psnr=protection["mean_psnr"])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["cuda", "em", "rem"])
    parser.add_argument("--eps", type=float, default=8.0, help="EM/REM budget rho_u in 1/255 units (CUDA ignores it).")
    parser.add_argument("--dataset", default=str(SHARED_CIFAR10))
    parser.add_argument("--cuda_timing_images", type=int, default=10_000)
    parser.add_argument("--max_train_samples", type=int, default=None, help="Smoke runs only (default: the cpu preset's 10k).")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Smoke runs only (default: 2k).")
    parser.add_argument("--epochs", type=int, default=None, help="Victim epochs, smoke runs only (default: the preset's 12).")
    parser.add_argument("--em_iterations", type=int, default=None, help="Smoke runs only (default: the cpu preset's).")
    parser.add_argument("--rem_iterations", type=int, default=None, help="Smoke runs only (default: the cpu preset's).")
    parser.add_argument("--runs_dir", default=None, help="Runs folder (default: bench/runs); smoke runs use their own.")
    parser.add_argument("--results_dir", default=None, help="Results folder (default: bench/results).")
    args = parser.parse_args()
    use_folders(args.runs_dir, args.results_dir)
    if "cuda" in args.methods:
        common.ensure_cuda_key()

    rows, runs = [], {}
    for name, label, protect_dir in (("clean", "clean", None), ("sep-fa-vr-eps8", "sep-fa-vr (eps 8)", "protect-sep-fa-vr-eps8")):
        found = reference(name, protect_dir)
        runs[label] = found or {"missing": "run python bench/sep_effectiveness.py first"}
        rows.append([label, *(["not run"] * 4)] if found is None else [
            label, found.get("max_linf", "-"), f"{found['mean_psnr']:.1f}" if "mean_psnr" in found else "-",
            f"{found['crafting_seconds']:.0f}" if "crafting_seconds" in found else "-", f"{found['eval_accuracy']:.4f}"])
    for method in args.methods:
        protection = protect(method, args)
        result = victim(f"{method}-eps{args.eps:g}", str(Path(protection["output_dir"]) / "dataset"), args)
        craft = crafting_seconds(protection)
        runs[method] = {"eval_accuracy": result["eval_accuracy"], "crafting_seconds": craft,
                        "wall_seconds": protection["wall_seconds"], "max_linf": protection["max_linf"],
                        "mean_psnr": protection["mean_psnr"], "eps": protection["eps"], "fit": protection.get("fit"),
                        "config": protection["config"], "victim_train_seconds": result["train_seconds"],
                        "history": [row["eval_accuracy"] for row in result["history"]]}
        if runs[method]["fit"]:
            runs[method]["fit"] = {k: v for k, v in runs[method]["fit"].items() if k != "history"}
        rows.append([method, protection["max_linf"], f"{protection['mean_psnr']:.1f}", f"{craft:.0f}",
                     f"{result['eval_accuracy']:.4f}"])
    speed = time_cuda(args)
    table = markdown_table(["training data", "max L-inf (1/255)", "PSNR dB", "crafting s", "victim clean test acc"], rows)
    labels = {"filter_one_call": f"apply_cuda, {speed['images']} images in one call",
              "filter_batches_of_250": "apply_cuda, batches of 250",
              "map_function_batches_of_250": "Dataset.map function, batches of 250 (PNG decode + filter + PNG encode)"}
    thread_keys = [key for key in speed if key.startswith("threads_")]
    table += "\n\n" + markdown_table(["CUDA in-process, images/s", *(k.replace("_", " ") for k in thread_keys)],
                                       [[text, *(f"{speed[k][name]:.0f}" for k in thread_keys)] for name, text in labels.items()])
    write_results(NAME, {
        "setup": {"train_images": args.max_train_samples or 10_000, "test_images": args.max_eval_samples or 2_000,
                  "protect": "recipes/protect.py --preset cpu --splits train (EM/REM source: smallnet_cifar)",
                  "eps": f"{args.eps:g}/255 (EM/REM; CUDA has no L-inf budget)",
                  "victim": f"{MODEL}, preset cpu ({args.epochs or 12} epochs), Trainer",
                  "cuda_key": "from $SEP_HF_CUDA_KEY (not recorded)"},
        "commands": ["python bench/sep_effectiveness.py  # clean and SEP-FA-VR rows",
                     "python bench/other_protections_cpu.py " + " ".join(sys.argv[1:])],
        "runs": runs, "cuda_speed": speed,
    }, table)


if __name__ == "__main__":
    main()
