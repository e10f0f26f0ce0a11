"""GAD's fixes end to end on the demo task (#15): the RL path works on a known reward (and fails with the
advantage sign flipped), guards stop a collapsing run and say why, per-stage learning rates, the replay
buffer survives kill -9 bit for bit, and tools/ablate.py writes its table and plot."""

import json
import os
import subprocess
import sys

import pytest
from conftest import HERE, ROOT
from test_gad_train import env, kill9_after_step, lines, run_train, write_config

from gad_megatron.data import demo

SCORER = "gad_megatron.data.demo:score"


def rows(run_dir):
    return [json.loads(x) for x in lines(run_dir)]


def evals(run_dir):
    return {r["eval"]: r for r in rows(run_dir) if "eval" in r}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return demo.make_student(str(tmp_path_factory.mktemp("demo") / "student"), seed=5)


def demo_task_config(path, student, run_dir, **over):
    """The demo task at a size the suite can afford: 1 rank, megatron rollouts, batch 16 x n 4."""
    base = {"parallel.nproc": 1, "data.heldout_size": 32, "data.max_response_tokens": 12, "rollout.max_tokens": 12,
            "train.batch_prompts": 32, "train.micro_batch_tokens": 1024, "g_optim.lr": 3e-3, "d_optim.lr": 1e-3,
            "g_optim.schedule": "cosine", "g_optim.min_lr": 1e-5,
            "eval.max_tokens": 12, "eval.samples": 4, "checkpoint.save_every": 1000, "log.dump_samples_every": 0,
            "log.plot": False, "log.tensorboard": False, "checkpoint.export_hf_at_end": False}
    return write_config(path, student, run_dir, **{**base, **over})


WARM = 120  # warmup steps of the shared warm start


@pytest.fixture(scope="module")
def warm_start(student, tmp_path_factory):
    """A SeqKD warm start: 120 warmup steps at batch 32 (D trained only in the last 4), saved at its end (the
    schedule spans 160 steps, as the runs continuing from it)."""
    base = tmp_path_factory.mktemp("warm")
    cfg = demo_task_config(base / "w.yaml", student, base / "run", **{
        "train.warmup_steps": WARM, "train.total_steps": WARM + 40, "train.stop_after": WARM,
        "train.critic_warmup": 1, "train.d_warmup_last": 4, "checkpoint.save_every": WARM})
    run_train(cfg, timeout=900)
    return base / "run" / "checkpoints"


def continue_gad(tmp_path, student, warm, name, steps=40, extra_env=None, **over):
    cfg = demo_task_config(tmp_path / f"{name}.yaml", student, tmp_path / name, **{
        "train.warmup_steps": WARM, "train.total_steps": WARM + steps, "train.critic_warmup": 1,
        "checkpoint.resume": str(warm), "eval.heldout_every": 10, **over})
    run_train(cfg, timeout=900, extra_env=extra_env)
    return tmp_path / name


def test_the_rl_path_raises_a_known_reward_and_fails_with_the_sign_flipped(student, warm_start, tmp_path):
    over = {"reward.source": "scorer", "gad_stage.g_lr": 3e-4, "gad_stage.g_schedule": "constant",
            "eval.heldout_every": 0}
    up = continue_gad(tmp_path, student, warm_start, "up", **over, **{"reward.scorer": SCORER})
    down = continue_gad(tmp_path, student, warm_start, "down", **over, **{"reward.scorer": "scorers:negated"},
                        extra_env={"PYTHONPATH": f"{ROOT}:{HERE}"})
    start, end_up, end_down = (evals(up)["after_warmup"]["heldout_score_sampled"], evals(up)["after"]["heldout_score_sampled"],
                               evals(down)["after"]["heldout_score_sampled"])
    assert evals(down)["after_warmup"]["heldout_score_sampled"] == start  # the same warm start and draws
    assert end_up > start + 0.05, (start, end_up)  # measured: 0.059 -> 0.167 in 40 steps
    assert end_down < start - 0.02, (start, end_down)
    assert not os.path.exists(up / "checkpoints" / "discriminator")  # a fixed scorer: no D built or saved


def test_guards_stop_a_collapsing_run_and_say_why(student, warm_start, tmp_path):
    bad = {"gad_stage.g_lr": 3e-2, "gad_stage.g_schedule": "constant", "eval.heldout_every": 10}
    free = continue_gad(tmp_path, student, warm_start, "free", steps=20, **bad)
    start = evals(free)["after_warmup"]["heldout_score_sampled"]
    margin = 0.03
    assert evals(free)["after"]["heldout_score_sampled"] < start - margin, "the bad setting did not collapse"
    guarded = continue_gad(tmp_path, student, warm_start, "guarded", steps=20, **bad, **{"guard.heldout_margin": margin})
    summary = json.load(open(guarded / "summary.json"))
    assert "fell below the warm start" in summary["stopped_by_guard"]
    assert summary["steps"] < WARM + 20  # stopped before the end, with its checkpoint
    assert open(guarded / "checkpoints" / "latest").read() == str(summary["steps"])
    assert not os.path.exists(guarded / "stopped.json")  # not a requeue request
    assert "stopped by a guard" in open(f"{tmp_path / 'guarded.yaml'}.log").read()


def test_stage_lrs_and_replay_buffer_resume_bit_exact(student, tmp_path):
    """The GAD stage's own lr and batch (gad_stage.*) from its first step on, and a resume inside the stage
    (replay buffer included) equal to the uninterrupted run."""
    over = {"reward.replay_steps": 3, "gad_stage.g_lr": 5e-4, "gad_stage.g_schedule": "constant",
            "gad_stage.batch_prompts": 4, "g_optim.lr": 2e-3, "g_optim.schedule": "constant"}
    a = tmp_path / "a"
    run_train(write_config(tmp_path / "a.yaml", student, a, **over))
    stage_lr = {(r["stage"], r["g_lr"]) for r in rows(a) if "g_lr" in r}
    assert stage_lr == {("warmup", 2e-3), ("gad", 5e-4)}, stage_lr
    state = json.load(open(a / "checkpoints" / "trainer" / "iter_0000006" / "state.json"))
    fifo = state["reward"]["replay"]["fifo"]
    # The last 3 steps are the 3 GAD steps, gad_stage.batch_prompts=4 prompts each (train.batch_prompts=8; the
    # first GAD step used to draw its batch before the stage's batch size was set: 8).
    assert [len(groups) for groups in fifo] == [4, 4, 4], [len(groups) for groups in fifo]
    c = tmp_path / "c"
    cfg = write_config(tmp_path / "c.yaml", student, c, **over)
    kill9_after_step(cfg, c, 5)
    assert open(c / "checkpoints" / "latest").read() == "4"
    run_train(cfg)
    assert lines(c) == lines(a)


def test_ablate_writes_its_table_and_plot(tmp_path):
    out = tmp_path / "abl"
    r = subprocess.run([sys.executable, "tools/ablate.py", "local", "--out", str(out), "--variants", "seqkd", "gad",
                        "--seeds", "1", "2", "--warmup-steps", "3", "--steps", "2", "rollout.engine=megatron",
                        "parallel.nproc=1", "train.batch_prompts=8", "data.heldout_size=8", "eval.samples=2",
                        "rollout.n=2"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = json.load(open(out / "ablation.json"))["table"]
    assert set(table) == {"warm start", "seqkd", "gad"}
    for v in ("seqkd", "gad"):
        assert table[v]["seeds"] == 2 and table[v]["heldout_ce"][0] > 0
    assert table["gad"]["d_acc"][0] is not None and table["seqkd"]["d_acc"][0] is None
    assert "| seqkd | 2 |" in open(out / "ablation.md").read()
    assert os.path.getsize(out / "ablation.png") > 1000
