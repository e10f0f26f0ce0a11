"""Starting the ranks of a command the way Megatron users do: under ``torchrun`` / ``srun`` the command is
already one rank (env:// rendezvous from RANK / WORLD_SIZE or SLURM_*); a plain invocation that needs N
ranks re-launches itself under ``torch.distributed.run``.

SIGINT / SIGTERM / SIGUSR1 / SIGHUP sent to the launcher are forwarded to its ranks (SIGUSR1 straight to
the ranks: torchrun does not pass it on). The launcher, torchrun
and the ranks stay in the caller's process group (``kill -9 -PGID`` reaches all of them), and each of them
asks the kernel to be killed when its parent dies (Linux ``PR_SET_PDEATHSIG``), so even ``kill -9`` of the
launcher alone leaves no orphan rank writing a checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


LAUNCHER_PID = "GAD_LAUNCHER_PID"  # set by relaunch() for the processes it starts


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux; a no-op elsewhere). A rank sets this only after its
    imports (seconds on a loaded machine): if the launcher died before, no signal will ever come, so it checks
    that the launcher (whose pid relaunch() passed down) is still there, and exits at once if not."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher and launcher.isdigit() and int(launcher) != os.getpid() and not pid_alive(int(launcher)):
        os._exit(1)  # our launcher is gone: nothing will ever read this rank's result


def pid_alive(pid: int) -> bool:
    """This host's process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its own parent) is not alive either
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def under_launcher() -> bool:
    # SLURM_STEP_NUM_TASKS is set inside an `srun` step (not in the batch script itself).
    return "WORLD_SIZE" in os.environ or "SLURM_STEP_NUM_TASKS" in os.environ


def relaunch(module: str, argv: list, nproc: int) -> int:
    """Runs ``python -m torch.distributed.run --nproc-per-node nproc -m module argv``; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent, env={**os.environ, LAUNCHER_PID: str(os.getpid())})

    def forward(signum, _frame):
        targets = [proc.pid]  # torchrun passes SIGINT / SIGTERM / SIGHUP on to the ranks itself
        if signum == signal.SIGUSR1:
            # torchrun neither handles nor passes on SIGUSR1 (it would die of it, taking the ranks along):
            # the ranks get it directly, as srun delivers `--signal=USR1@T` to every task.
            import psutil

            try:
                targets = [c.pid for c in psutil.Process(proc.pid).children()]
            except psutil.Error:
                targets = []
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.kill()
