"""Trustworthy runs at the process level (#17): single-rank runs on one host do not collide on a port; a
checkpoint saved before G's first step resumes."""

import subprocess
import sys
import time

from conftest import ROOT

HOLD = """
import sys, time
from gad_megatron.runtime import ParallelConfig, initialize, destroy
initialize(ParallelConfig(device="cpu"))
print("up", flush=True)
time.sleep(6)
destroy()
"""


def test_two_single_rank_runs_on_one_host_do_not_collide():
    """#17 5: each plain single-rank process used to bind port 29500; the second one failed."""
    env = {"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", HOLD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    time.sleep(0.5)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "up" in out, err[-2000:]
