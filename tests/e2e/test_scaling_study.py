"""tools/scaling_study.py (#8): a sweep over world sizes 1, 2, 4 on CPU (gloo) writing its table and plot next
to gad-plan's prediction; the cluster sweep is one `sbatch --array` job."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.multirank  # beyond its folder's markers

TOOL = os.path.join(ROOT, "tools", "scaling_study.py")


def test_local_sweep_writes_table_and_plot(tmp_path):
    out = tmp_path / "scaling"
    r = subprocess.run([sys.executable, TOOL, "local", "--worlds", "1", "2", "--out", str(out), "--steps", "4",
                        "--skip", "2"], capture_output=True, text=True, cwd=ROOT, timeout=1200,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.load(open(out / "scaling.json"))
    assert [x["world"] for x in rows] == [1, 2]
    for x in rows:
        assert x["tokens_per_second"] > 0 and x["peak_mem_gib"] > 0 and x["steps"] == 2
        assert x["split"]["rollout"] > 0 and x["split"]["g_update"] > 0 and x["split"]["d_update"] > 0
        assert x["predicted"]["tokens_per_second"] > 0
        want = x["tokens_per_second"] / (rows[0]["tokens_per_second"] * x["world"])
        assert abs(x["efficiency"] - want) < 1e-9
    assert rows[0]["efficiency"] == 1.0
    md = open(out / "scaling.md").read()
    assert sum(l.startswith("| ") for l in md.splitlines()) == 3 and "predicted tokens/s" in md  # header + 2 rows
    assert os.path.getsize(out / "scaling.png") > 10_000


def test_cluster_sweep_is_one_array_job(tmp_path):
    r = subprocess.run([sys.executable, TOOL, "slurm", "--config", "examples/configs/gad_qwen2.5_7b.yaml", "--nodes",
                        "1", "2", "4", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    script = open(tmp_path / "sweep.sbatch").read()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --nodes=4" in script
    assert "  0) N=1 ;;" in script and "  2) N=4 ;;" in script and "parallel.nproc=$((N * 8))" in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "sweep.sbatch")]).returncode == 0
