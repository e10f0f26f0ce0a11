"""#22: the Slurm job in a container (every python step through srun into it, mounts, one named container,
SRUN_CPUS_PER_TASK, CUDA_DEVICE_MAX_CONNECTIONS, the signal lead from the planner), the planner's checkpoint
and disk numbers, and gad-train's free-space refusal before any model is built."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

TWO_BY_EIGHT = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[017-018]", "SLURM_NNODES": "2",
                "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "16"}
CONFIG_14B = "examples/configs/gad_qwen2.5_14b.yaml"


def fake_cluster(tmp_path):
    """A PATH whose `python` has no torch (it fails, and leaves a mark) and whose `srun` records its options,
    the environment a step gets, then runs the command the way the container would (the project's python)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    host_mark = tmp_path / "host_python_ran"
    (bin_dir / "python").write_text(f"#!/bin/sh\ntouch {host_mark}\n"
                                    "echo \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    log = tmp_path / "srun.jsonl"
    (bin_dir / "srun").write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
i = 0
while i < len(args) and args[i].startswith("-"):
    i += 1
keys = ("SRUN_CPUS_PER_TASK", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_DEBUG")
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"opts": args[:i], "cmd": args[i:], "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")
cmd = args[i:]
if cmd[0] == "python":
    cmd[0] = {sys.executable!r}
os.execv(cmd[0], cmd)
""")
    for f in ("python", "srun"):
        os.chmod(bin_dir / f, 0o755)
    return bin_dir, log, host_mark


def job_env(bin_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(TWO_BY_EIGHT, DRY_RUN="1", PYTHONPATH=ROOT, GAD_ROOT=ROOT, PATH=f"{bin_dir}:/usr/bin:/bin", **extra)
    env.pop("PYTHON", None)
    return env


def planner_shell(*args) -> dict:
    p = subprocess.run([sys.executable, "-m", "gad_megatron.plan", "--config", CONFIG_14B, "--nodes", "2", "--shell", *args],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert p.returncode == 0, p.stderr
    return dict(line.split("=", 1) for line in p.stdout.splitlines())


def test_container_job_runs_every_python_step_in_the_named_container(tmp_path):
    bin_dir, log, host_mark = fake_cluster(tmp_path)
    data = tmp_path / "teacher" / "rows.jsonl"
    run_dir = tmp_path / "run"
    model = "/models/Qwen2.5-14B-Instruct"
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "gad_14b.sh")], capture_output=True, text=True, cwd="/",
                       timeout=300, env=job_env(bin_dir, CONTAINER_IMAGE="docker://gad-megatron:0.1", DATA=str(data),
                                                RUN_DIR=str(run_dir), CKPT_WRITE_GBS="4", GAD_NCCL_DEBUG="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not host_mark.exists()  # the host's python (no torch) was never asked
    steps = [json.loads(x) for x in open(log)]
    printed = [shlex.split(x[len("command: "):]) for x in r.stdout.splitlines() if x.startswith("command: ")]
    # the helpers ran through srun; conversion, gad-doctor and training are srun steps too
    assert [s["cmd"][:3] for s in steps] == [["python", "-m", "gad_megatron.runtime.slurm"], ["python", "-m", "gad_megatron.plan"]]
    assert [c[0] for c in printed] == ["srun"] * 3
    assert [next(a for a in c if not a.startswith("-") and a != "srun") for c in printed] == ["gad-convert", "gad-doctor", "gad-train"]
    all_opts = [s["opts"] for s in steps] + [[a for a in c if a.startswith("--")] for c in printed]
    names = {o for opts in all_opts for o in opts if o.startswith("--container-name=")}
    assert names == {"--container-name=gad-gad_qwen2.5_14b"}
    for opts in all_opts:
        assert "--container-image=docker://gad-megatron:0.1" in opts and f"--container-workdir={ROOT}" in opts
        mounts = next(o for o in opts if o.startswith("--container-mounts=")).split("=", 1)[1].split(",")
        for path in (ROOT, str(run_dir), model, str(data.parent)):
            assert f"{path}:{path}" in mounts, (path, mounts)
    for s in steps:
        assert s["env"] == {"SRUN_CPUS_PER_TASK": "16", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_DEBUG": "INFO"}
    # the signal lead is the planner's: checkpoint bytes / the configured bandwidth + one step + slack
    plan = planner_shell("--ckpt-write-gbs", "4", f"data.train={data}")
    train = printed[-1]
    assert f"--signal=USR1@{plan['SIGNAL_LEAD_S']}" in train
    assert int(plan["SIGNAL_LEAD_S"]) == int(plan["CKPT_WRITE_S"]) + int(plan["STEP_S"]) + 60 or \
        abs(int(plan["SIGNAL_LEAD_S"]) - (float(plan["CKPT_GB"]) / 4 + float(plan["STEP_S"]) + 60)) <= 2
    assert f"checkpoint: {plan['CKPT_GB']} GB" in r.stdout and f"disk needed {plan['DISK_NEED_GB']} GB" in r.stdout
    # 38.3 predicted hours in a 24 h job: said, with the requeues that carry it on
    assert f"the predicted run ({plan['RUN_HOURS']} h) exceeds the job's time limit (24:00:00)" in r.stderr
    assert "1 requeue(s)" in r.stderr


def test_planner_checkpoint_and_disk_numbers_for_the_14b_run():
    """Qwen2.5-14B, bf16: G and D (each 14.7B / 13.2B parameters without / with the scalar head) x (2 weight + 4
    master + 8 Adam bytes); keep_last 3 (+1 being written) + the bf16 export."""
    from gad_megatron.models.params import total_params
    from gad_megatron.models.storage import checkpoint_bytes, disk_need_bytes
    from gad_megatron.plan.cli import load_arch

    arch = load_arch("qwen2.5-14b")
    g, d = total_params(arch, "student"), total_params(arch, "discriminator")
    assert checkpoint_bytes(arch, "bf16") == (g + d) * 14
    assert checkpoint_bytes(arch, "fp32", with_discriminator=False) == g * 12
    assert disk_need_bytes(arch, "bf16", 3, True) == 4 * (g + d) * 14 + g * 2
    plan = planner_shell()
    assert float(plan["CKPT_GB"]) == round((g + d) * 14 / 1e9, 1)
    assert int(plan["CKPT_WRITE_S"]) == -(-(g + d) * 14 // int(2e9))  # the default 2 GB/s


def test_free_space_refusal_comes_before_any_model_is_built(tmp_path, monkeypatch, capsys):
    """A run directory whose filesystem holds less than keep_last + 1 checkpoints + the export: one line naming
    log.run_dir and the numbers, exit 2, nothing written."""
    from gad_megatron.data import demo
    from gad_megatron.trainer import cli

    student = demo.make_student(str(tmp_path / "student"), seed=5)
    monkeypatch.setenv("GAD_DEMO_DIR", str(tmp_path / "demo"))  # --demo's own student, not in the checkout
    real = os.statvfs

    class Small:
        f_frsize, f_bavail = 4096, 10  # 40 kB free

    monkeypatch.setattr(os, "statvfs", lambda p: Small() if str(p).startswith(str(tmp_path / "runs")) else real(p))
    built = []
    import gad_megatron.trainer.run as run

    monkeypatch.setattr(run, "build_trainer", lambda *a, **k: built.append(1))
    (tmp_path / "runs").mkdir()
    run_dir = tmp_path / "runs" / "r"
    rc = cli.main(["--demo", f"model.student={student}", f"log.run_dir={run_dir}", "parallel.nproc=1"])
    err = capsys.readouterr().err
    assert rc == 2 and not built, err
    assert f"log.run_dir={run_dir}: 0.00 GB free on its filesystem, the run needs" in err
    assert "checkpoint.keep_last" in err and not run_dir.exists()
    monkeypatch.setattr(os, "statvfs", real)
    assert cli.main(["--demo", f"model.student={student}", f"log.run_dir={run_dir}", "--check"]) == 0
