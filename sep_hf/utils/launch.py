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

Every process started this way dies with the one that started it (``die_with_parent()``): killing
``accelerate launch``, even with SIGKILL, must not leave a recipe running that would still push to
the Hub when it finishes. The chain is ``accelerate launch`` -> recipe -> (for N > 1)
``torch.distributed.run`` -> N recipe workers; each link gets the kernel's parent-death signal.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys

import torch
from accelerate.commands.launch import launch_command_parser

from sep_hf.utils.logging import get_logger

__all__ = ["die_with_parent", "prepare_launch", "relaunch_cpu_processes", "requested_cpu_processes"]

logger = get_logger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set by the relaunch for the torch.distributed.run workers: the pid of the recipe process that relaunched,
# which must be their grandparent (see _relauncher_gone).
_RELAUNCHER_PID_ENV = "SEP_HF_RELAUNCHER_PID"


@functools.lru_cache(maxsize=1)
def _prctl():
    """libc's ``prctl``, or None off Linux (or without a usable libc): the parent-death signal is Linux-only."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the interpreter is linked to libc already
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _request_parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies. Async-signal-safe enough for a
    ``preexec_fn`` once ``_prctl()`` was resolved in the parent: no allocation, lock or logging."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])  # the name may hold spaces and ")"
    except (OSError, IndexError, ValueError):
        return None


def _relauncher_gone() -> bool:
    """True in a relaunched worker whose relauncher already died (before the signal could be armed).

    Read once, then dropped from the environment, so that processes started by the worker are not judged
    by a grandparent that is not theirs.
    """
    relauncher = os.environ.pop(_RELAUNCHER_PID_ENV, "")
    return relauncher.isdigit() and _parent_of(os.getppid()) != int(relauncher)


def _started_by_a_launcher() -> bool:
    """Whether our parent is ``accelerate launch`` or a ``torch.distributed.run`` agent (torchrun, or the
    relaunch). Only then is dying with the parent right: ``nohup python recipes/x.py &`` must outlive
    the shell it was typed in."""
    return _launcher_argv() is not None or "TORCHELASTIC_RUN_ID" in os.environ


def die_with_parent() -> None:
    """Under a launcher, get SIGKILLed when it dies; exit now if it already died. No-op off Linux.

    Without this, ``kill -9`` of ``accelerate launch`` (or of the relaunching recipe) leaves the
    workers running unsupervised, and they would still push checkpoints or a dataset to the Hub when
    they finish. A parent that died before the signal was armed is noticed by a changed parent pid
    (we were reparented) or, in relaunched workers, by a grandparent that is not the relauncher.
    """
    parent = os.getppid()
    if _prctl() is None or not (_started_by_a_launcher() or _RELAUNCHER_PID_ENV in os.environ):
        return
    if not _request_parent_death_signal():
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this process will outlive its launcher",
                       ctypes.get_errno())
        return
    if os.getppid() != parent or _relauncher_gone():
        sys.exit(f"sep_hf: the process that launched this one (pid {parent}) is gone; exiting instead of "
                 "running (and pushing to the Hub) unsupervised.")


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
    env[_RELAUNCHER_PID_ENV] = str(os.getpid())
    logger.info("accelerate's --cpu launcher started 1 process; starting %d with torch.distributed.run", num_processes)
    sys.exit(subprocess.call(command, env=env, preexec_fn=_die_with(os.getpid()) if _prctl() else None))


def _die_with(parent: int):
    """``preexec_fn`` giving ``torch.distributed.run`` the parent-death signal: it does not call
    ``prepare_launch()`` itself, and would otherwise keep its workers alive after we are killed."""
    def arm() -> None:
        if not _request_parent_death_signal() or os.getppid() != parent:
            os._exit(1)
    return arm


def _share_cores_if_threads_were_defaulted() -> None:
    parent_env = _parent_proc("environ")
    if parent_env is None or any(item.startswith("OMP_NUM_THREADS=") for item in parent_env):
        return  # the user chose a thread count

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def prepare_launch() -> None:
    """Call first in every recipe: dies with its launcher, fixes accelerate's CPU launcher (module docstring)."""
    die_with_parent()
    relaunch_cpu_processes()
    if _launcher_argv() is not None:
        _share_cores_if_threads_were_defaulted()


def end_process_group() -> None:
    """Destroy torch.distributed's process group at the end of a command. Left to the interpreter's exit, gloo's
    threads are torn down in no fixed order and a rank aborts now and then ("terminate called without an
    active exception", SIGABRT after the work is done: 6 of 12 two-process runs here, none once destroyed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
