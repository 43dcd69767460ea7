"""Make ``accelerate launch --cpu --num_processes N`` start N processes, each with its share of cores.

accelerate 1.x runs ``--cpu`` jobs through its simple launcher, which starts ONE process whatever
``--num_processes`` says (huggingface/accelerate#2741; multi-CPU needs mpirun and a hostfile). A
recipe calls ``relaunch_cpu_processes()`` first: when it finds itself started that way with N > 1,
it runs itself again under ``torch.distributed.run`` with N local processes. Those inherit
``ACCELERATE_USE_CPU``, so ``Accelerator()`` sets them up as MULTI_CPU with the gloo backend, the
CPU stand-in for multi-GPU data parallelism.

The launcher also exports ``OMP_NUM_THREADS=1`` unless ``--num_processes`` is given explicitly,
which halves throughput on a 2-core machine; when the user did not set it themselves,
``prepare_launch()`` gives each local process its share of the cores instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

__all__ = ["prepare_launch", "relaunch_cpu_processes", "requested_cpu_processes"]

logger = logging.getLogger(__name__)


def _parent_proc(name: str) -> list[str] | None:
    try:
        with open(f"/proc/{os.getppid()}/{name}", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:  # not Linux, or no access: leave everything as accelerate set it
        return None


def _launcher_argv() -> list[str] | None:
    """Arguments given to the parent ``accelerate launch`` (before the script), if that is our parent."""
    argv = _parent_proc("cmdline")
    if argv is None:
        return None
    for index, part in enumerate(argv):
        if part == "launch" and index > 0 and os.path.basename(argv[index - 1]).startswith("accelerate"):
            return argv[index + 1 :]
        if part == "accelerate.commands.launch":
            return argv[index + 1 :]
    return None


def requested_cpu_processes() -> int:
    """How many processes ``accelerate launch --cpu --num_processes N`` asked for (1 if not that case)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return 1
    argv = _launcher_argv()
    if not argv:
        return 1
    from accelerate.commands.launch import launch_command_parser

    known, _ = launch_command_parser().parse_known_args(argv)
    return int(known.num_processes or 1)


def relaunch_cpu_processes() -> None:
    """If N > 1 CPU processes were requested but only this one runs, run N and exit with their status."""
    num_processes = requested_cpu_processes()
    if num_processes <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
        "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", env.get("MASTER_PORT", "29500"),
        sys.argv[0], *sys.argv[1:],
    ]
    logger.info("accelerate's --cpu launcher started 1 process; starting %d with torch.distributed.run", num_processes)
    sys.exit(subprocess.call(command, env=env))


def _share_cores_if_threads_were_defaulted() -> None:
    parent_env = _parent_proc("environ")
    if parent_env is None or any(item.startswith("OMP_NUM_THREADS=") for item in parent_env):
        return  # the user chose a thread count
    import torch

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def prepare_launch() -> None:
    """Call first in every recipe: fixes accelerate's CPU launcher (see the module docstring)."""
    relaunch_cpu_processes()
    if _launcher_argv() is not None:
        _share_cores_if_threads_were_defaulted()
