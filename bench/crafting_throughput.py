"""Crafting throughput: sep-hf's batched ensemble vs a loop written the way the official SEP code works.

    python bench/crafting_throughput.py [--images 500] [--paper_images 32]

Measured on this machine's CPU cores (run it on an otherwise idle machine):
* CPU scale: the `cpu` source run's K=6 small-net checkpoints (bench/runs/source-cpu), T=10, eps 8/255.
* Paper scale: K=15 ResNet-18 (CIFAR stem) checkpoints, T=30 (weights are random: speed does not
  depend on them), on a few images.
The official-style loop, for every outer step, reloads every checkpoint from disk with
`torch.load` and runs the K models one at a time in fp32 (VR's inner steps reload again).
Achieved FLOP/s counts the forward and backward FLOPs of crafting (torch FlopCounterMode) and is
compared with a large convolution's FLOP/s measured here in the same precision (``fraction_of_peak``);
every row is measured in bf16 (where this CPU runs it fast) and in fp32 (``--precisions``).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RUNS_DIR, markdown_table, write_results
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from sep_hf import CheckpointEnsemble, SEPConfig, craft_sep
from sep_hf.models import build_model, model_from_config
from sep_hf.protect.methods.sep import target_classes, vr_picks
from sep_hf.source.checkpoints import save_checkpoint
from sep_hf.utils.runtime import fast_bf16


def official_style(images, labels, checkpoint_files, config_record, config: SEPConfig, class_means=None):
    """The official code's structure: reload each checkpoint from disk per use, one model at a time, fp32."""
    model = model_from_config(config_record).eval()
    eps, alpha = config.eps, config.step_size
    target = target_classes(labels, config_record["num_classes"])
    K = len(checkpoint_files)

    def grad(k, point):
        model.load_state_dict(torch.load(checkpoint_files[k], weights_only=True))
        point = point.clone().requires_grad_(True)
        if class_means is None:
            loss = F.cross_entropy(model(point), target)
        else:
            loss = F.mse_loss(model.features(point), class_means[k][target])
        return torch.autograd.grad(loss, point)[0]

    x = images.clone()
    for step in range(config.steps):
        grads = [grad(k, x) for k in range(K)]
        mean = sum(grads) / K
        if config.method != "sep-fa-vr":
            direction = mean
        else:
            inner, direction = x.clone(), torch.zeros_like(x)
            picks = vr_picks(torch.zeros(1, dtype=torch.long), config.seed, step, config.vr_steps or K, K)[0]
            for j in picks.tolist():  # one pick per batch, as in the official code
                direction += grad(j, inner) - (grads[j] - mean)
                inner = torch.min(torch.max(inner - alpha * direction.sign(), images - eps), images + eps).clamp(0, 1)
        x = torch.min(torch.max(x - alpha * direction.sign(), images - eps), images + eps).clamp(0, 1)
    return x


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _crafting_flops(images, labels, ensemble, config, means) -> float:
    """FLOPs of one outer step (forward + backward), from torch's FLOP counter."""
    one_step = SEPConfig(**{**config.__dict__, "steps": 1})
    with FlopCounterMode(display=False) as counter:
        craft_sep(images, labels, ensemble, one_step, class_means=means)
    return counter.get_total_flops() * config.steps


def conv_peak_flops(bf16: bool) -> float:
    """FLOP/s of a large 3x3 convolution (256 -> 256 channels, 64 x 32 x 32), forward, this precision."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(64, 256, 32, 32).contiguous(memory_format=torch.channels_last)
    flops = 2 * 64 * 256 * 256 * 9 * 32 * 32
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.no_grad()
    with torch.no_grad(), context:
        conv(x)
        seconds = min(_timed(conv, x) for _ in range(5))
    return flops / seconds


def paper_scale_ensemble(directory: Path, num_models: int = 15) -> Path:
    """15 ResNet-18 (CIFAR) checkpoints with random weights, laid out like a source run."""
    for epoch in range(8, 8 * num_models + 1, 8):
        torch.manual_seed(epoch)
        model = build_model("resnet18_cifar", 10)
        save_checkpoint(directory, epoch, model.state_dict(), {"model": model.config, "class_names": [str(i) for i in range(10)]})
    return directory


def measure(name, ensemble, images, labels, methods, steps, baseline_images, precision, peak, official=True):
    """Rows of one scale in one precision: img/s, GFLOP/s and the fraction of that precision's conv peak."""
    bf16 = precision == "bf16"
    rows, results = [], []
    pt_dir = Path(tempfile.mkdtemp(prefix="official-style-"))
    pt_files = []
    for index, path in enumerate(ensemble.checkpoint_paths):  # the official code torch.save's state dicts
        pt_files.append(pt_dir / f"ckpt-{index}.pt")
        torch.save(load_file(path / "model.safetensors"), pt_files[-1])
    means = ensemble.class_means(images, labels)
    for method in methods:
        config = SEPConfig(method=method, steps=steps, bf16=bf16)
        uses_means = means if config.uses_features else None
        craft_sep(images[:8], labels[:8], ensemble, SEPConfig(method=method, steps=1, bf16=bf16), class_means=uses_means)
        ours = _timed(craft_sep, images, labels, ensemble, config, class_means=uses_means)
        sample = min(64, len(images))  # FLOPs counted on a sample, scaled to every image
        flops = _crafting_flops(images[:sample], labels[:sample], ensemble, config, uses_means) * len(images) / sample
        rate, gflops = len(images) / ours, flops / ours / 1e9
        row = {"scale": name, "method": method, "num_models": ensemble.num_models, "steps": steps,
               "precision": precision, "img_per_s": rate, "gflops": gflops,
               "fraction_of_peak": flops / ours / peak[precision], "images": len(images), "seconds": ours,
               "gradient_evaluations_per_image": config.gradient_evaluations(ensemble.num_models)}
        if official:
            official_seconds = _timed(official_style, images[:baseline_images], labels[:baseline_images], pt_files,
                                      ensemble.records[0]["model"], config, uses_means)
            row.update(official_style_img_per_s=baseline_images / official_seconds,
                       speedup=rate / (baseline_images / official_seconds))
        results.append(row)
        rows.append([name, method, ensemble.num_models, steps, precision, f"{rate:.2f}", f"{gflops:.1f}",
                     f"{100 * row['fraction_of_peak']:.0f}%",
                     f"{row['speedup']:.1f}x" if official else "-"])
    return rows, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--baseline_images", type=int, default=100)
    parser.add_argument("--paper_images", type=int, default=32)
    parser.add_argument("--paper_steps", type=int, default=30,
                        help="T at paper scale (the paper's 30; fewer measure the same per-step rate sooner).")
    parser.add_argument("--checkpoints", default=str(RUNS_DIR / "source-cpu"))
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="bf16 and/or fp32 (default: both where bf16 is fast, else fp32 only).")
    parser.add_argument("--no_official", action="store_true", help="Skip the (slow) official-style baseline.")
    args = parser.parse_args()
    precisions = args.precisions or (["bf16", "fp32"] if fast_bf16("cpu") else ["fp32"])

    from sep_hf.data.view import DataArguments, load_training_data

    data = load_training_data(DataArguments(dataset=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10"),
                                            max_train_samples=args.images, max_eval_samples=10))
    images, labels = data.train_images.float() / 255, data.train_labels
    peak = {"bf16": conv_peak_flops(True), "fp32": conv_peak_flops(False)}
    cpu_ensemble = CheckpointEnsemble.from_pretrained(args.checkpoints, num_models=6)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paper_ensemble = CheckpointEnsemble.from_pretrained(paper_scale_ensemble(Path(tmp)), num_models=15)
        for precision in precisions:
            for scale in [("cpu (small net)", cpu_ensemble, images, labels, ["sep", "sep-fa", "sep-fa-vr"], 10,
                           args.baseline_images),
                          ("paper (ResNet-18)", paper_ensemble, images[: args.paper_images],
                           labels[: args.paper_images], ["sep", "sep-fa-vr"], args.paper_steps, min(8, args.paper_images))]:
                scale_rows, scale_results = measure(*scale, precision, peak, official=not args.no_official)
                rows += scale_rows
                results += scale_results
    table = markdown_table(["scale", "method", "K", "T", "precision", "img/s", "GFLOP/s", "% of peak",
                            "vs official-style"], rows)
    table += (f"\n\nLarge-convolution reference on this machine: {peak['bf16'] / 1e9:.0f} GFLOP/s (bf16 autocast), "
              f"{peak['fp32'] / 1e9:.0f} GFLOP/s (fp32); % of peak is against the row's precision.")
    write_results("crafting_throughput", {
        "command": "python bench/crafting_throughput.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "rows": results, "conv_reference_flops_per_second": peak, "bf16_fast_here": fast_bf16("cpu"),
    }, table)


if __name__ == "__main__":
    main()
