"""sep_hf.utils.launch: every process started through prepare_launch() dies with its launcher.

A recipe left running after ``kill -9`` of ``accelerate launch`` would still push to the Hub when it
finishes; these tests kill the launcher and check that nothing of the run survives it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT, launch_command

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")

# Writes "<pid>.pid" (holding its parent pid) once prepare_launch() returned, then idles like a long run.
WORKER = """
import os, sys, time
from pathlib import Path
from sep_hf.utils.launch import prepare_launch

prepare_launch()
out = Path(sys.argv[1])
(out / f".{os.getpid()}.tmp").write_text(str(os.getppid()))
os.replace(out / f".{os.getpid()}.tmp", out / f"{os.getpid()}.pid")
time.sleep(120)
"""


def _env(**extra) -> dict[str, str]:
    launched = ("ACCELERATE_", "TORCHELASTIC_", "SEP_HF_", "WORLD_SIZE", "LOCAL_RANK")  # as if typed in a shell
    env = {key: value for key, value in os.environ.items() if not key.startswith(launched)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def _state(pid: int) -> str | None:
    """Process state letter from /proc, or None once it is gone. Orphans are reaped by pid 1, if at all."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _chain_up_to(pid: int, ancestor: int) -> list[int]:
    """``pid`` and its ancestors below ``ancestor`` (the processes between the launcher and a worker)."""
    chain = []
    while pid not in (ancestor, 0, 1, None):
        chain.append(pid)
        pid = _parent(pid)
    assert pid == ancestor, f"worker is not a descendant of the launcher {ancestor}: {chain}"
    return chain


@pytest.mark.parametrize("num_processes", [1, 2])
def test_workers_die_with_the_launcher(tmp_path, num_processes):
    script, out, log = tmp_path / "worker.py", tmp_path / "pids", tmp_path / "launch.log"
    script.write_text(WORKER)
    out.mkdir()
    with open(log, "wb") as output:
        launcher = subprocess.Popen(launch_command(str(script), [out], num_processes), cwd=REPO_ROOT, env=_env(),
                                    stdout=output, stderr=subprocess.STDOUT)
    run: set[int] = set()
    try:
        started = _wait_for(lambda: len(list(out.glob("*.pid"))) == num_processes or launcher.poll() is not None,
                            timeout=60, interval=0.2)
        pids = sorted(int(path.stem) for path in out.glob("*.pid"))
        assert started and len(pids) == num_processes, f"workers did not start ({pids}):\n{log.read_text()[-3000:]}"
        # For 2 processes: accelerate launch -> recipe (relauncher) -> torch.distributed.run -> 2 workers
        for pid in pids:
            run.update(_chain_up_to(pid, launcher.pid))
        assert len(run) == (1 if num_processes == 1 else 4), run

        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)  # our child: reap it
        survivors = lambda: [pid for pid in sorted(run) if _alive(pid)]  # noqa: E731
        assert _wait_for(lambda: not survivors(), timeout=10), (
            f"still running after kill -9 of accelerate launch: {survivors()}\n{log.read_text()[-3000:]}")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in run:  # only the processes of this run, found above
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_direct_run_outlives_its_shell(tmp_path):
    """Without a launcher nothing is armed: `nohup python recipes/x.py &` must survive its shell."""
    script, out = tmp_path / "worker.py", tmp_path / "pids"
    script.write_text(WORKER)
    out.mkdir()
    shell = subprocess.Popen(["sh", "-c", f'"{sys.executable}" "{script}" "{out}" & wait'], env=_env())
    pid = None
    try:
        assert _wait_for(lambda: any(out.glob("*.pid")), timeout=20)
        pid = int(next(out.glob("*.pid")).stem)
        assert _parent(pid) == shell.pid
        os.kill(shell.pid, signal.SIGKILL)
        shell.wait(timeout=10)
        time.sleep(1)
        assert _alive(pid)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_worker_of_a_dead_relauncher_exits(tmp_path):
    """A relaunched worker whose relauncher died before it could arm the signal exits instead of running."""
    script, out = tmp_path / "worker.py", tmp_path / "pids"
    script.write_text(WORKER)
    out.mkdir()
    # the grandparent (our parent, pytest's) is not the relauncher named here: as if it had died
    env = _env(TORCHELASTIC_RUN_ID="test", WORLD_SIZE="1", SEP_HF_RELAUNCHER_PID=str(2**22 + 1))
    result = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "is gone" in result.stderr, result.stderr
    assert not any(out.glob("*.pid"))


@pytest.mark.parametrize("outcome", ["done", "user error"])
def test_a_command_ends_its_process_group(tmp_path, outcome):
    """run_main destroys torch.distributed's group when its command ends, however it ends: left to the interpreter's
    exit, a gloo rank aborted now and then after the work was done (SIGABRT, "terminate called without an active
    exception")."""
    import torch.distributed as dist

    from sep_hf.cli import run_main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    def command(argv):
        assert dist.is_initialized()
        if outcome == "user error":
            raise ValueError("bad flag")

    try:
        if outcome == "done":
            run_main(command, [])
        else:
            with pytest.raises(SystemExit):
                run_main(command, [])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
