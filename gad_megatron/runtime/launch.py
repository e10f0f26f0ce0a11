"""Starting the ranks of a command the way Megatron users do: under ``torchrun`` / ``srun`` the command is
already one rank (env:// rendezvous from RANK / WORLD_SIZE or SLURM_*); a plain invocation that needs N
ranks re-launches itself under ``torch.distributed.run``.

The launched ranks live in their own process group; SIGINT / SIGTERM / SIGUSR1 / SIGHUP sent to the
launcher are forwarded to the whole group, and if the launcher exits first the group is killed, so killing
the command stops every rank (no orphan keeps writing a checkpoint).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def under_launcher() -> bool:
    # SLURM_STEP_NUM_TASKS is set inside an `srun` step (not in the batch script itself).
    return "WORLD_SIZE" in os.environ or "SLURM_STEP_NUM_TASKS" in os.environ


def relaunch(module: str, argv: list, nproc: int) -> int:
    """Runs ``python -m torch.distributed.run --nproc-per-node nproc -m module argv``; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything still alive in the group (the ranks after a crash)
        except ProcessLookupError:
            pass
