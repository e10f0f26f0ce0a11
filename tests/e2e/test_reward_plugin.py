"""#34: a reward of the user's own is one class in one file; reward.source names it (path/to/file.py:Class) and
gad-train, its --check and gad-plan take it with no edit anywhere else."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT  # noqa: E402  (the repository root)

# The whole plugin: rewards short answers, from the tokens alone (no D is built, none is budgeted).
PLUGIN = '''
import torch

from gad_megatron.trainer.rewards import Reward, Scores


class ShortAnswers(Reward):
    """-(answer tokens) / data.max_response_tokens for every student sample and teacher answer."""

    def __init__(self, limit):
        self.limit = limit

    @classmethod
    def build(cls, ctx):
        return cls(ctx.cfg.data.max_response_tokens)

    @classmethod
    def validate(cls, cfg, bad):
        if cfg.rollout.n < 2:
            bad("rollout.n", "ShortAnswers compares samples of a group: at least 2")

    def score(self, batch):
        rewards = torch.tensor([-len(s.token_ids) / self.limit for g in batch.groups for s in g], dtype=torch.float64)
        teacher = torch.tensor([-len(e.response) / self.limit for e in batch.examples], dtype=torch.float64)
        return Scores(rewards, teacher, {"short_reward_mean": rewards.mean().item()})
'''


def _run(args, tmp_path, timeout=600, demo="demo"):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "GAD_DEMO_DIR": str(tmp_path / demo)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin")
    (d / "my_reward.py").write_text(PLUGIN)
    return d


def test_a_reward_class_of_ones_own_is_checked_planned_and_trained(plugin):
    spec = "reward.source=my_reward.py:ShortAnswers"  # relative to the working directory, as a scorer's path
    fast = ["rollout.engine=megatron", "parallel.nproc=1", "train.warmup_steps=1", "train.total_steps=3",
            "train.d_warmup_last=1", "eval.heldout_every=0", "checkpoint.save_every=3"]
    p = _run(["gad_megatron.trainer.cli", "--demo", "--check", spec, *fast], plugin)
    assert p.returncode == 0, p.stderr[-3000:]
    # its own config rule is asked, by --check, with the key named
    p = _run(["gad_megatron.trainer.cli", "--demo", "--check", spec, "rollout.n=1", *fast], plugin)
    assert p.returncode == 2 and "rollout.n=1: ShortAnswers compares samples" in p.stderr, p.stderr[-2000:]
    # gad-plan budgets what the class says it builds: no D (no D weights, grads or Adam state, no D passes)
    cfg = os.path.join(ROOT, "examples", "configs", "gad_qwen2.5_14b.yaml")
    plans = {}
    for name, over in (("gad", []), ("mine", [spec])):
        p = _run(["gad_megatron.plan.cli", "--config", cfg, "--nodes", "2", "--json", *over], plugin, 300)
        assert p.returncode == 0, p.stderr[-2000:]
        plans[name] = json.loads(p.stdout)
    assert plans["gad"]["workload"]["discriminator"] and not plans["mine"]["workload"]["discriminator"]
    assert plans["mine"]["step_s"]["d_scores"] == plans["mine"]["step_s"]["d_update"] == 0.0
    assert plans["gad"]["step_s"]["d_update"] > 0
    ratio = plans["mine"]["memory_gib"]["optimizer"] / plans["gad"]["memory_gib"]["optimizer"]
    assert 0.45 < ratio < 0.55, ratio  # G's Adam state alone: half of G's and D's
    # gad-train trains G with it: its metric is logged each GAD step; no D is built or saved
    p = _run(["gad_megatron.trainer.cli", "--demo", spec, *fast], plugin)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run = plugin / "demo"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    gad = [r for r in rows if r.get("stage") == "gad"]
    assert len(gad) == 2 and all(-1.0 <= r["short_reward_mean"] < 0 for r in gad), gad
    ckpt = run / "checkpoints"
    assert not list(ckpt.rglob("discriminator")) and list(ckpt.rglob("student"))


def test_a_reward_spec_that_does_not_load_is_one_line_naming_reward_source(plugin, monkeypatch):
    from gad_megatron.trainer.config import ConfigError, load_config

    monkeypatch.chdir(plugin)  # a file spec is relative to the working directory
    base = ["model.student=/nowhere", "data.train=/nowhere.jsonl"]
    for spec, says in (("my_reward.py:Missing", "cannot be imported"), ("my_reward.py:torch", "not a subclass"),
                       ("nowhere.py:X", "cannot be imported"), ("critic", "use one of discriminator")):
        with pytest.raises(ConfigError, match=f"reward.source='{spec}': .*{says}"):
            load_config(None, base + [f"reward.source={spec}"])
    p = _run(["gad_megatron.trainer.cli", "--demo", "--check", "reward.source=my_reward.py:Missing"], plugin,
             demo="fresh")  # (not the trained run's directory: its resume check would refuse the change too)
    assert p.returncode == 2 and "reward.source='my_reward.py:Missing': cannot be imported" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
