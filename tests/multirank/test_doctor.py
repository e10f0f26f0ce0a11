"""#22 item 4: gad-doctor on CPU with gloo: every check that applies runs and reports a number, GPU-only checks say
"skipped: no GPU" (never PASS), and each FAIL path (a model unreadable on one rank, a run directory not shared
between two ranks, free space below need, a bus-bandwidth minimum above what gloo reaches) is one line and exit 1."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from conftest import ROOT

from gad_megatron.data import demo

DOCTOR = [sys.executable, "-m", "gad_megatron.doctor.cli"]
CHECKS = ["gpus", "driver", "fp8", "versions", "rendezvous", "model", "data", "shm", "ulimits", "cpu_affinity",
          "allreduce", "shared_fs", "disk", "engine", "preflight"]


DEMO_DIR = tempfile.mkdtemp(prefix="gad_doctor_demo_")  # --demo makes its student there, not in the checkout


def env(**extra):
    out = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    return {**out, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "GAD_DEMO_DIR": DEMO_DIR, **extra}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return demo.make_student(str(tmp_path_factory.mktemp("doctor") / "student"), seed=5)


def rows(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in CHECKS and parts[1] in ("PASS", "WARN", "FAIL", "SKIP"):
            out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


@pytest.mark.parametrize("nproc", [2, 4])
def test_doctor_on_cpu_runs_every_check_that_applies(student, tmp_path, nproc):
    run_dir = tmp_path / "run"
    p = subprocess.run(DOCTOR + ["--demo", f"parallel.nproc={nproc}", f"model.student={student}", f"log.run_dir={run_dir}"],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    got = rows(p.stdout)
    assert list(got) == CHECKS, p.stdout
    for gpu_only in ("gpus", "driver", "fp8"):
        assert got[gpu_only] == ("SKIP", "-- skipped: no GPU")
    assert got["engine"][0] == "SKIP"  # --deep only
    assert all(got[c][0] in ("PASS", "WARN") for c in CHECKS if c not in ("gpus", "driver", "fp8", "engine"))
    assert f"x {nproc} ranks, gloo/tcp" in got["allreduce"][1] and float(got["allreduce"][1].split()[0]) > 0
    assert "torch 2.13.0" in got["versions"][1] and "megatron-core 0.16.1" in got["versions"][1]
    assert "GB free, write" in got["disk"][1] and "/dev/shm" in got["shm"][1] and "CPU(s)" in got["cpu_affinity"][1]
    assert "MB)" in got["model"][1] and "MB)" in got["data"][1] and " ms" in got["rendezvous"][1]
    report = json.load(open(run_dir / "doctor.json"))
    assert report["ok"] and report["world"] == nproc and len(report["ranks"]) == nproc
    assert [c["name"] for c in report["checks"]] == CHECKS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(per_rank_args: list, tmp_path) -> tuple:
    """Two ranks started by hand (as srun would on two nodes), each with its own overrides."""
    port = str(_free_port())
    procs = []
    for rank, args in enumerate(per_rank_args):
        e = env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(DOCTOR + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=ROOT, env=e))
    outs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outs[0][0], outs[0][1] + outs[1][1]


def test_a_model_unreadable_on_one_rank_fails(student, tmp_path):
    broken = tmp_path / "student_on_node2"
    shutil.copytree(student, broken)
    weights = next(f for f in os.listdir(broken) if f.endswith(".safetensors"))
    os.remove(broken / weights)
    os.symlink("/nonexistent/stale-mount/" + weights, broken / weights)  # a stale mount on the second node
    base = ["--demo", f"log.run_dir={tmp_path / 'run'}"]
    rcs, out, err = two_ranks([base + [f"model.student={student}"], base + [f"model.student={broken}"]], tmp_path)
    assert rcs == [1, 1], out + err
    status, text = rows(out)["model"]
    assert status == "FAIL" and f"rank 1 ({socket.gethostname()}) cannot read model.student {broken}" in text


def test_a_run_directory_not_shared_between_ranks_fails(student, tmp_path):
    base = ["--demo", f"model.student={student}"]
    rcs, out, err = two_ranks([base + [f"log.run_dir={tmp_path / 'node1'}"], base + [f"log.run_dir={tmp_path / 'node2'}"]], tmp_path)
    assert rcs == [1, 1], out + err
    status, text = rows(out)["shared_fs"]
    assert status == "FAIL" and "rank 1" in text and "log.run_dir is not shared with rank 0" in text


def test_free_space_below_need_fails(student, tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.run(DOCTOR + ["--demo", f"model.student={student}", f"log.run_dir={run_dir}", "parallel.nproc=1",
                                 "checkpoint.keep_last=100000000000"],  # 1e11 checkpoints of the demo model
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    status, text = rows(p.stdout)["disk"]
    assert status == "FAIL" and f"log.run_dir={run_dir}:" in text and "GB free on its filesystem, the run needs" in text


def test_a_bus_bandwidth_minimum_above_what_gloo_reaches_fails(student, tmp_path):
    p = subprocess.run(DOCTOR + ["--demo", f"model.student={student}", f"log.run_dir={tmp_path / 'run'}",
                                 "parallel.nproc=2", "--min-busbw-gbs", "1000"],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    status, text = rows(p.stdout)["allreduce"]
    assert status == "FAIL" and "below the minimum 1000.0 GB/s (--min-busbw-gbs)" in text
    assert json.load(open(tmp_path / "run" / "doctor.json"))["ok"] is False
