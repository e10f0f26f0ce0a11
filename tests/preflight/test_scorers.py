"""A scorer that fails on a row, returns what is no number, or hangs: one line naming it and the row; metrics
stay strict JSON (#24 round 3)."""

import pytest

from gad_megatron.data import demo
from gad_megatron.data.teacher import DataError
from gad_megatron.trainer.build import plan_steps
from gad_megatron.trainer.preflight import Findings, check_config, check_positions
from gad_megatron.trainer.config import ConfigError, load_config


from demo_config import config, student  # noqa: E402,F401  (the shared fixture)


def test_metrics_jsonl_is_strict_json(student, tmp_path):
    """Item 9: a step with nothing to measure d_acc on (every sample truncated) logged a bare NaN."""
    import json

    from gad_megatron.trainer.metrics import RunLog

    cfg = config(student, tmp_path, "log.tensorboard=false")
    log = RunLog(cfg, str(tmp_path / "run"), rank=0)
    log.step(1, {"d_acc": float("nan"), "d_loss": float("inf"), "g_loss": 0.5, "nested": [float("-inf"), 1.0]},
             {"step_seconds": 1.0})
    log.close()

    def strict(text):
        raise ValueError(f"not JSON: {text}")

    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").read(), parse_constant=strict)
    assert row == {"step": 1, "d_acc": None, "d_loss": None, "g_loss": 0.5, "nested": [None, 1.0]}


@pytest.mark.parametrize("name, said", [("nan_on_count", "returned nan"), ("none_on_count", "returned None"),
                                        ("raises_on_count", "raised KeyError: 'no rule for count'")])
def test_a_scorer_failing_on_a_row_is_one_line_naming_it_and_the_row(student, tmp_path, name, said):
    """Items 15 and 16: a scorer raising, returning None, or NaN on some rows: a traceback naming neither the
    scorer nor the row, or every update skipped ending in 'all steps skipped'."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from test_gad_train import write_config

    cfg = write_config(tmp_path / "c.yaml", student, tmp_path / "run", **{
        "parallel.nproc": 1, "reward.source": "scorer", "reward.scorer": f"scorers:{name}", "train.warmup_steps": 0,
        "train.critic_warmup": 0, "train.total_steps": 2, "eval.at_start": False, "data.heldout_size": 8})
    p = subprocess.run([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gad-train: error: reward.scorer=scorers:{name} {said}") and "prompt id 'demo-" in last, last
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def test_ctrl_c_while_a_scorer_hangs_says_so_at_once(student, tmp_path):
    """Item 22: the first Ctrl-C was swallowed without a word for as long as the scorer ran."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from test_gad_train import write_config

    cfg = write_config(tmp_path / "c.yaml", student, tmp_path / "run", **{
        "parallel.nproc": 1, "reward.source": "scorer", "reward.scorer": "scorers:slow_on_count",
        "train.warmup_steps": 0, "train.critic_warmup": 0, "train.total_steps": 2, "eval.at_start": False})
    marker, err = tmp_path / "scoring", open(tmp_path / "err", "w")
    p = subprocess.Popen([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], cwd=ROOT, stderr=err,
                         stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}",
                                                         "OMP_NUM_THREADS": "1", "GAD_TEST_MARKER": str(marker)})
    try:
        deadline = time.time() + 240
        while not marker.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), open(tmp_path / "err").read()[-3000:]
        p.send_signal(signal.SIGINT)
        time.sleep(3)
        said = open(tmp_path / "err").read()
        assert "gad-train: Ctrl-C: stopping when this step ends" in said and p.poll() is None, said[-2000:]
        p.send_signal(signal.SIGINT)  # the second one stops at once
        assert p.wait(timeout=30) == 130
    finally:
        if p.poll() is None:
            p.kill()
