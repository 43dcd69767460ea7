"""Training throughput of the registered CIFAR models on this machine (images/s, batch 128, 32x32).

    python bench/train_throughput.py [--models smallnet_cifar resnet18_cifar] [--steps 30]

One SGD step = forward, cross-entropy, backward, update, on a batch already in memory: the loop's
own cost, as train_source.py runs it (channels_last; bf16 autocast where the CPU has AMX/AVX512-BF16).
Target (issue 2): the small net trains >= 1,000 images/s on 2 CPU cores.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from common import markdown_table, write_results

from sep_hf.models import build_model
from sep_hf.utils.runtime import fast_bf16


def images_per_second(name: str, bf16: bool, channels_last: bool, steps: int, batch: int = 128) -> float:
    torch.manual_seed(0)
    model = build_model(name, 10).train()
    x = torch.rand(batch, 3, 32, 32)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smallnet_cifar", "resnet18_cifar"])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows, results = [], {}
    for name in args.models:
        params = sum(p.numel() for p in build_model(name, 10).parameters())
        steps = args.steps if name == "smallnet_cifar" else max(3, args.steps // 6)
        for bf16 in ([False, True] if fast_bf16("cpu") else [False]):
            rate = images_per_second(name, bf16, True, steps)
            results[f"{name}/{'bf16' if bf16 else 'fp32'}"] = {"params": params, "images_per_second": rate}
            rows.append([name, f"{params / 1e6:.2f}M", "bf16 autocast" if bf16 else "fp32", f"{rate:.0f}"])
    table = markdown_table(["model", "parameters", "precision", "training images/s (batch 128)"], rows)
    table += f"\n\n{torch.get_num_threads()} threads. train_source.py uses bf16 autocast here (--mixed_precision auto)."
    write_results("train_throughput", {"command": "python bench/train_throughput.py", "threads": torch.get_num_threads(),
                                       "results": results}, table)


if __name__ == "__main__":
    main()
