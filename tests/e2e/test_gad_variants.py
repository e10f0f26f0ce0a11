"""GAD's fixes end to end on the demo task (#15): the RL path works on a known reward (and fails with the
advantage sign flipped), guards stop a collapsing run and say why, per-stage learning rates, the replay
buffer survives kill -9 bit for bit, and tools/ablate.py writes its table and plot."""

import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import HERE, ROOT
from test_gad_train import env, kill9_after_step, lines, run_train, write_config

from gad_megatron.data import demo
from gad_megatron.eval import paired

SCORER = "gad_megatron.data.demo:score"


def rows(run_dir):
    return [json.loads(x) for x in lines(run_dir)]


def evals(run_dir):
    return {r["eval"]: r for r in rows(run_dir) if "eval" in r}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return demo.make_student(str(tmp_path_factory.mktemp("demo") / "student"), seed=5)


def demo_task_config(path, student, run_dir, **over):
    """The demo task at a size the suite can afford: 1 rank, megatron rollouts, batch 32 x n 4; all 384 shipped
    rows train, HELDOUT fresh prompts of the same task are held out (a 32-prompt split measured a score to
    +-0.03-0.045: wider than the effects these tests look for)."""
    base = {"parallel.nproc": 1, "data.heldout": str(run_dir.parent / "heldout.jsonl"), "data.heldout_size": 0,
            "data.max_response_tokens": 12, "rollout.max_tokens": 12,
            "train.batch_prompts": 32, "train.micro_batch_tokens": 1024, "g_optim.lr": 3e-3, "d_optim.lr": 1e-3,
            "g_optim.schedule": "cosine", "g_optim.min_lr": 1e-5,
            "eval.max_tokens": 12, "eval.samples": 4, "checkpoint.save_every": 1000, "log.dump_samples_every": 0,
            "log.plot": False, "log.tensorboard": False, "checkpoint.export_hf_at_end": False}
    return write_config(path, student, run_dir, **{**base, **over})


WARM = 120  # warmup steps of the shared warm start
HELDOUT = 256  # held-out prompts: the task's next rows after the shipped 384 (make_rows is one seeded stream)


def write_heldout(folder):
    with open(folder / "heldout.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in demo.make_rows(384 + HELDOUT)[384:])


@pytest.fixture(scope="module")
def warm_start(student, tmp_path_factory):
    """A SeqKD warm start: 120 warmup steps at batch 32 (D trained only in the last 4), saved at its end (the
    schedule spans 160 steps, as the runs continuing from it)."""
    base = tmp_path_factory.mktemp("warm")
    write_heldout(base)
    cfg = demo_task_config(base / "w.yaml", student, base / "run", **{
        "train.warmup_steps": WARM, "train.total_steps": WARM + 40, "train.stop_after": WARM,
        "train.critic_warmup": 1, "train.d_warmup_last": 4, "checkpoint.save_every": WARM})
    run_train(cfg, timeout=900)
    return base / "run" / "checkpoints"


def continue_gad(tmp_path, student, warm, name, steps=40, extra_env=None, **over):
    cfg = demo_task_config(tmp_path / f"{name}.yaml", student, tmp_path / name, **{
        "train.warmup_steps": WARM, "train.total_steps": WARM + steps, "train.critic_warmup": 1,
        "checkpoint.resume": str(warm), "eval.heldout_every": 10,
        "data.heldout": str(warm.parent.parent / "heldout.jsonl"), **over})
    run_train(cfg, timeout=900, extra_env=extra_env)
    return tmp_path / name


def reward_change(run_dir, sign=1.0):
    """The scorer's mean over the last quarter of the GAD steps minus the first quarter's (each step's mean over
    its 32 prompts x n 4 samples; ``sign`` -1 undoes a negated reward) and the standard error of that difference
    from the step-to-step spread."""
    r = [sign * x["reward_mean"] for x in rows(run_dir) if x.get("stage") == "gad"]
    q = len(r) // 4
    (a, sa), (b, sb) = paired.mean_se(r[:q]), paired.mean_se(r[-q:])
    return b - a, (sa**2 + sb**2) ** 0.5


def heldout_change(run_dir):
    """The held-out sampled score's change from the warm start to the end, prompt by prompt, and its paired
    standard error: far below either score's own (between-prompt spread cancels)."""
    c = paired.heldout_change(str(run_dir), "after_warmup", "after")
    assert c.prompts == HELDOUT
    return c.change, c.se


def test_the_rl_path_raises_a_known_reward_and_fails_with_the_sign_flipped(student, warm_start, tmp_path):
    """#33 item 2. Judged by statistics, not by one noisy score: the training reward (last vs first quarter of
    40 GAD steps, 1,280 samples each) and the held-out sampled score (256 fresh prompts x 8 samples, compared prompt by
    prompt) each move by more than 3 standard errors, up with the scorer as reward and down with it negated.
    (The old check, one held-out score over 32 x 4 samples up by 0.05, sat within 2 standard errors of 0.03-0.045:
    it failed on CI at +0.036 while the reward curve rose clearly.)"""
    over = {"reward.source": "scorer", "gad_stage.g_lr": 3e-4, "gad_stage.g_schedule": "constant",
            "eval.heldout_every": 0, "eval.samples": 8}
    up = continue_gad(tmp_path, student, warm_start, "up", steps=80, **over, **{"reward.scorer": SCORER})
    down = continue_gad(tmp_path, student, warm_start, "down", steps=80, **over, **{"reward.scorer": "scorers:negated"},
                        extra_env={"PYTHONPATH": f"{ROOT}:{HERE}"})
    assert evals(down)["after_warmup"] == evals(up)["after_warmup"]  # the same warm start and draws
    rise, rise_se = reward_change(up)
    fall, fall_se = reward_change(down, sign=-1.0)
    held_up, held_up_se = heldout_change(up)
    held_down, held_down_se = heldout_change(down)
    print(f"reward: up {rise:+.4f} +- {rise_se:.4f}, negated {fall:+.4f} +- {fall_se:.4f}; held-out: up "
          f"{held_up:+.4f} +- {held_up_se:.4f}, negated {held_down:+.4f} +- {held_down_se:.4f}")
    assert rise > 3 * rise_se and held_up > 3 * held_up_se, (rise, rise_se, held_up, held_up_se)
    # With the sign flipped the same check fails: the true score does not rise by 3 standard errors by either
    # measure, and each run ends apart from the other by more than 3 standard errors of their difference. (A
    # fall by 3 SE is not asked: from a score near its floor, ~0.06, the negated run fell by -0.005 +- 0.004
    # (reward) and -0.012 +- 0.0045 (held-out) on 2026-12-08's machine, by more on earlier ones.)
    assert not (fall > 3 * fall_se) and not (held_down > 3 * held_down_se), (fall, fall_se, held_down, held_down_se)
    assert rise - fall > 3 * (rise_se**2 + fall_se**2) ** 0.5, (rise, fall)
    assert held_up - held_down > 3 * (held_up_se**2 + held_down_se**2) ** 0.5, (held_up, held_down)
    assert evals(up)["after"]["heldout_score_sampled_se"] > 0  # each score's own standard error is in metrics.jsonl
    assert not os.path.exists(up / "checkpoints" / "discriminator")  # a fixed scorer: no D built or saved


def test_guards_stop_a_collapsing_run_and_say_why(student, warm_start, tmp_path):
    bad = {"gad_stage.g_lr": 3e-2, "gad_stage.g_schedule": "constant", "eval.heldout_every": 10,
           "eval.max_prompts": 100}
    free = continue_gad(tmp_path, student, warm_start, "free", steps=20, **bad)
    # #31 item 4: eval.max_prompts evaluates exactly that many held-out prompts, the same ones every time
    files = sorted(glob.glob(str(free / "heldout" / "*.jsonl")))
    assert len(files) == 3  # after_warmup (step 120), periodic (step 130; step 140 is the end), after
    ids = [[json.loads(x)["id"] for x in open(f)] for f in files]
    assert len(ids[0]) == 100 and all(i == ids[0] for i in ids), [len(i) for i in ids]
    assert "scorer, sampled" in open(f"{tmp_path / 'free.yaml'}.log").read() and " ±" in open(f"{tmp_path / 'free.yaml'}.log").read()
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
    md = open(out / "ablation.md").read()
    assert "| seqkd | 2 |" in md
    # #33 item 1: each score's cell has its evaluation error beside the seed spread, and a verdict against seqkd
    # says "separated" only past 2 standard errors of both
    k = "heldout_score_sampled"
    g, s = table["gad"], table["seqkd"]
    assert g[f"{k}_eval_se"] is not None and f"± {g[k][1]:.4f} (eval ± {g[f'{k}_eval_se']:.4f})" in md
    diff = g[k][0] - s[k][0]
    seed_se = (g[k][1] ** 2 / 2 + s[k][1] ** 2 / 2) ** 0.5
    eval_se = (g[f"{k}_eval_se"] ** 2 + s[f"{k}_eval_se"] ** 2) ** 0.5
    verdict = "separated" if abs(diff) > 2 * seed_se and abs(diff) > 2 * eval_se else "not separated"
    assert f"- gad: {diff:+.4f} (seed spread ± {seed_se:.4f}, evaluation ± {eval_se:.4f}): {verdict}\n" in md, md
    assert os.path.getsize(out / "ablation.png") > 1000
    # #32 item 22: the same --out with other settings reused the old runs and printed their table, exit 0
    again = subprocess.run([sys.executable, "tools/ablate.py", "local", "--out", str(out), "--variants", "seqkd",
                            "--seeds", "1", "--warmup-steps", "3", "--steps", "3", "rollout.engine=megatron"],
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "holds runs made with other settings (steps: 2 -> 3; overrides:" in again.stderr
    assert "ablate:" not in again.stdout  # nothing ran
