"""The sbatch scripts' logic under a fake SLURM_* environment (#8): rendezvous, ranks, layout and the exact
command lines, for 2 nodes x 8 GPUs and 1 x 1; `bash -n` on every shell script. (The SIGUSR1 -> checkpoint ->
resume path on real processes is in test_gad_train.py.)"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from gad_megatron.runtime.slurm import SlurmJob, expand_nodelist, task_env

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")) + glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "scripts", "*.sh")) + glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")))
TWO_BY_EIGHT = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[017-018]", "SLURM_NNODES": "2",
                "SLURM_GPUS_ON_NODE": "8"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def dry_run(script, slurm_env, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(slurm_env, **{"DRY_RUN": "1", "PYTHON": sys.executable, "PYTHONPATH": ROOT, "GAD_ROOT": ROOT, **extra})
    return subprocess.run(["bash", os.path.join(ROOT, "examples", script)], capture_output=True, text=True, env=env,
                          cwd="/", timeout=120)


def commands(out):
    return [shlex.split(l[len("command: "):]) for l in out.splitlines() if l.startswith("command: ")]


def test_14b_on_two_nodes_of_eight():
    r = dry_run("gad_14b.sh", TWO_BY_EIGHT)
    assert r.returncode == 0, r.stderr
    assert "2 node(s) x 8 GPU(s) = world 16; rendezvous gpu-017:24242" in r.stdout
    layout = re.search(r"\(TP=(\d+) PP=(\d+) DP=(\d+) rollout TP=(\d+)\)", r.stdout).groups()
    tp, pp, dp, rtp = map(int, layout)
    assert tp * pp * dp == 16 and "memory peak" in r.stdout and "predicted run" in r.stdout
    convert, doctor, train = commands(r.stdout)
    run_dir = os.path.join(ROOT, "runs", "gad_qwen2.5_14b")
    assert convert[:4] == ["srun", f"--nodes={-(-tp * pp // 8)}", f"--ntasks={tp * pp}", f"--ntasks-per-node={min(tp * pp, 8)}"]
    assert convert[4:] == ["gad-convert", "hf-to-mcore", "--hf", "/models/Qwen2.5-14B-Instruct", "--out",
                           f"{run_dir}/init/student", "--tp", str(tp), "--pp", str(pp), "--device", "cuda"]
    lead = re.search(r"SIGUSR1 (\d+) s before the time limit", r.stdout).group(1)
    args = ["--config", "examples/configs/gad_qwen2.5_14b.yaml", f"log.run_dir={run_dir}",
            f"model.student={run_dir}/init/student", "checkpoint.resume=auto", "parallel.nproc=16"]
    assert train == ["srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1", f"--signal=USR1@{lead}",
                     "gad-train"] + args
    assert doctor == ["srun", "--nodes=2", "--ntasks-per-node=8", "gad-doctor"] + args  # the run's own config
    # the #SBATCH lines ask for what the layout assumes, and for the requeue path
    head = open(os.path.join(ROOT, "examples", "gad_14b.sh")).read()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --time=24:00:00", "TIME_LIMIT=24:00:00"):
        assert line in head
    assert "#SBATCH --signal" not in head  # the lead is the planner's, on the training step
    # a container: every srun gets the pyxis flags
    r = dry_run("gad_14b.sh", TWO_BY_EIGHT, CONTAINER_IMAGE="docker://gad-megatron:0.1")
    for cmd in commands(r.stdout):
        assert "--container-image=docker://gad-megatron:0.1" in cmd and f"--container-workdir={ROOT}" in cmd


def test_one_by_one_with_a_local_model_and_a_layout_that_does_not_fit(tmp_path):
    from gad_megatron.data import demo

    student = demo.make_student(str(tmp_path / "student"))
    one = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "1"}
    demo_cfg = os.path.join(ROOT, "gad_megatron", "assets", "demo", "demo.yaml")
    r = dry_run("gad_3b.sh", one, CONFIG=demo_cfg, HF_MODEL=student, GAD_DEMO_DATA=demo.ASSET,
                RUN_DIR=str(tmp_path / "run"), OVERRIDES="rollout.n=2 train.total_steps=10")
    assert r.returncode == 0, r.stderr
    assert "1 node(s) x 1 GPU(s) = world 1; rendezvous n1:20007" in r.stdout
    assert "(TP=1 PP=1 DP=1 rollout TP=1)" in r.stdout
    convert, doctor, train = commands(r.stdout)
    assert convert[:4] == ["srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1"] and student in convert
    assert train[:4] == ["srun", "--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert train[-3:] == ["parallel.nproc=1", "rollout.n=2", "train.total_steps=10"]
    # the 14B layout (TP x PP = 16) on one GPU: refused before anything starts
    r = dry_run("gad_14b.sh", one)
    assert r.returncode == 1 and "does not fit" in r.stderr and "command:" not in r.stdout


def test_every_rank_of_a_two_by_eight_step():
    """Inside the srun step each task is one rank: RANK / LOCAL_RANK / WORLD_SIZE from SLURM_PROCID /
    SLURM_LOCALID / SLURM_NTASKS, the rendezvous on the first node; the runtime reads the same."""
    from gad_megatron.runtime import parallel

    assert expand_nodelist("gpu-[017-018]") == ["gpu-017", "gpu-018"]
    assert expand_nodelist("a[1-2,5],b7") == ["a1", "a2", "a5", "b7"]
    seen = set()
    for node in range(2):
        for local in range(8):
            env = {**TWO_BY_EIGHT, "SLURM_PROCID": str(node * 8 + local), "SLURM_LOCALID": str(local),
                   "SLURM_NODEID": str(node), "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}
            t = task_env(env)
            assert (t["WORLD_SIZE"], t["MASTER_ADDR"], t["MASTER_PORT"], t["NODE_RANK"]) == (16, "gpu-017", 24242, node)
            assert t["LOCAL_RANK"] == local
            seen.add(t["RANK"])
            old = dict(os.environ)
            try:
                for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                    os.environ.pop(k, None)
                os.environ.update(env)
                assert parallel._env_world() == (node * 8 + local, 16, local)
            finally:
                os.environ.clear()
                os.environ.update(old)
    assert seen == set(range(16))
    job = SlurmJob.from_env(TWO_BY_EIGHT)
    assert (job.world_size, job.master_addr, job.num_nodes) == (16, "gpu-017", 2)
    with pytest.raises(RuntimeError, match="SLURM_NNODES=3"):
        SlurmJob.from_env({**TWO_BY_EIGHT, "SLURM_NNODES": "3"})


def test_an_allocation_the_helper_refuses_stops_on_its_own_error():
    """#17 5: the SLURM helper's error was lost in ``eval "$(...)"``; the script died later on "unbound
    variable"."""
    bad = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "1"}
    r = dry_run("gad_3b.sh", bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "=2 but SLURM_JOB_NODELIST names 1 node(s)" in r.stderr and "unbound variable" not in r.stderr
    assert "gad_job.sh: not inside a Slurm allocation" in r.stderr and "command:" not in r.stdout


def test_a_typo_in_overrides_stops_on_gad_plans_error():
    """#32 item 19: a typo in OVERRIDES showed gad-plan's error, then the job died on 'LAYOUT: unbound variable'."""
    r = dry_run("gad_14b.sh", TWO_BY_EIGHT, OVERRIDES="rollout.nn=4")
    assert r.returncode == 2 and "unbound variable" not in r.stderr, r.stderr
    assert "rollout.nn" in r.stderr and 'gad-plan refused the config examples/configs/gad_qwen2.5_14b.yaml with ' \
        'OVERRIDES="rollout.nn=4"' in r.stderr and "command:" not in r.stdout


def test_a_python_without_the_project_is_named_not_misread_as_no_allocation(tmp_path):
    """#32 item 20: a host python without torch and no VENV gave a traceback, then 'not inside a Slurm allocation'."""
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\nexec /usr/bin/env -i /usr/bin/python3 -S \"$@\"\n")  # no site-packages: no torch
    bare.chmod(0o755)
    r = dry_run("gad_14b.sh", TWO_BY_EIGHT, PYTHON=str(bare))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not inside a Slurm" not in r.stderr, r.stderr
    assert f"gad_job.sh: {bare} cannot import torch and gad_megatron: set VENV=" in r.stderr
