"""A step that cannot finish is refused before it starts, saying what it would generate; the estimate grows
with the step and meets the limits (#24 round 3 item 25)."""

import pytest

from gad_megatron.data import demo
from gad_megatron.data.teacher import DataError
from gad_megatron.trainer.build import plan_steps
from gad_megatron.trainer.preflight import Findings, check_config, check_positions
from gad_megatron.trainer.config import ConfigError, load_config


from demo_config import config, student  # noqa: E402,F401  (the shared fixture)


def test_a_step_that_cannot_finish_is_refused_saying_what_it_would_generate(student, tmp_path):
    """Item 25: rollout.n=100000 passed every check and the first step ran for hours. Now gad-train says what a
    step generates and holds and the planner's time for it, and refuses a step beyond train.max_step_hours."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "gad_megatron.trainer.cli", "--check", f"model.student={student}", f"data.train={demo.ASSET}",
            f"log.run_dir={tmp_path}/run", "parallel.device=cpu", "parallel.nproc=2", "train.batch_prompts=8",
            "data.max_prompt_tokens=48", "data.max_response_tokens=12", "rollout.n=4"]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "one GAD step generates 32 samples (up to 384 new tokens) and holds up to 2,400 tokens" in ok.stderr
    assert "the planner's model (cpu, MFU 0.35) estimates" in ok.stderr
    # the case: the demo's 32 prompts a step, rollout.n=100000
    big = subprocess.run(base + ["train.batch_prompts=32", "rollout.n=100000"], capture_output=True, text=True,
                         timeout=300)
    assert big.returncode == 2, big.stderr
    err = big.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in big.stderr, big.stderr
    assert err[0].startswith("gad-train: error: 32 prompts x rollout.n=100000: 3,200,000 samples, up to 38,400,000 new "
                             "tokens a step; the planner's model (cpu, MFU 0.35) estimates ~"), err[0]
    assert "beyond train.max_step_hours=1.0" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_step_estimate_grows_with_the_step_and_meets_the_limits(student, tmp_path):
    """Item 25, the numbers behind the refusal: samples / tokens exact, seconds from the planner's model rising
    with rollout.n; a limit of null lets it through; a Slurm job ending before one step could finish refuses it."""
    import time

    from gad_megatron.models.hf_config import arch_spec_from_dir
    from gad_megatron.trainer.build import load_data
    from gad_megatron.trainer.step_estimate import check_step_time, estimate_step

    arch = arch_spec_from_dir(student)
    cfg4 = config(student, tmp_path, "rollout.n=4")
    data = load_data(cfg4)
    e4 = estimate_step(cfg4, arch, data.train)
    e4000 = estimate_step(config(student, tmp_path, "rollout.n=4000"), arch, data.train)
    assert (e4.samples, e4.new_tokens_max, e4.tokens_held) == (32, 384, 8 * 4 * 60 + 8 * 60)
    assert (e4000.samples, e4000.new_tokens_max) == (32000, 384000)
    assert 0 < e4.gad_step_s < e4000.gad_step_s and e4000.gad_step_s > 100 * e4.gad_step_s
    check_step_time(cfg4, e4, env={})
    big = config(student, tmp_path, "train.batch_prompts=32", "rollout.n=100000")
    e_big = estimate_step(big, arch, data.train)
    with pytest.raises(ConfigError, match=r"beyond train.max_step_hours=1.0"):
        check_step_time(big, e_big, env={})
    check_step_time(config(student, tmp_path, "train.batch_prompts=32", "rollout.n=100000", "train.max_step_hours=null"),
                    e_big, env={})
    ends_soon = {"SLURM_JOB_END_TIME": str(int(time.time()) + 30)}
    check_step_time(cfg4, e4, env=ends_soon)  # a fraction of a second fits
    with pytest.raises(ConfigError, match=r"this Slurm job ends in .* no step could finish and be checkpointed"):
        check_step_time(cfg4, e4000, env=ends_soon)
    with pytest.raises(ConfigError, match=r"train.max_step_hours=0.0: must be > 0"):
        config(student, tmp_path, "train.max_step_hours=0")
