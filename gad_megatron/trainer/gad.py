"""The GAD stages, top to bottom. Each takes the :class:`~gad_megatron.trainer.build.Trainer`, the step, the
global batch of examples, the step's :class:`~gad_megatron.trainer.policy.RolloutBatch` (sampled by the loop
before the stage when :func:`needs_rollout` says so, else None) and a timer, and returns the step's metrics
(``tokens`` included). A stage talks to G (``t.policy``) and the reward (``t.reward``), nothing else.

- ``warmup``  G learns the teacher's answers by cross-entropy (SeqKD) while the reward (D) learns
  Bradley-Terry on (teacher answer, current student samples), every ``train.d_warmup_every`` steps (or in the
  last ``train.d_warmup_last``); G learns from step ``train.critic_warmup`` counted from 1 as verl counts.
- ``gad``     old logprobs (G), reference logprobs, reward scores of the student samples (taken *before* the
  reward's update, as the reference code does) -> reward update (D: BT) -> G update (GRPO, with the reward's
  per-token advantages when it gives them) -> weight sync into the rollout engine.
- ``seqkd``   the SFT baseline on the same data (``train.stage=seqkd``): the warmup's G update alone.

Rollouts for the global batch come from one engine (vLLM on global rank 0, or the megatron engine on every
rank) and every data-parallel rank takes its contiguous share of whole prompt groups, so the samples and
everything computed from them are independent of the DP size. The loop that calls these is ``run.py``.
"""

from __future__ import annotations

import time

import torch

from gad_megatron.algo.policy import grpo_advantages, truncated_rewards
from gad_megatron.trainer import passes
from gad_megatron.trainer.metrics import max_over_world, reduce_pairs
from gad_megatron.trainer.policy import dp_share, teacher_seq


class Timer:
    """Seconds per named phase of a step: ``with timer("rollout"): ...``."""

    def __init__(self):
        self.t = {}

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


# --------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------
def stage_seqkd(t, step: int, examples: list, b, timer) -> dict:
    mine = dp_share(t.world, examples)
    with timer("g_update"):
        m = t.policy.sft_update([teacher_seq(e) for e in mine])
    m["tokens"] = sum(len(e.prompt) + len(e.response) for e in examples)
    return m


def g_learns(t, step: int) -> bool:
    """verl's ``critic_warmup <= global_step`` with its steps counted from 1: D alone before."""
    return step + 1 >= t.cfg.train.critic_warmup


def d_learns_in_warmup(t, step: int) -> bool:
    return warmup_trains_d(t.cfg.train, t.schedule.warm, step, bool(t.reward.engines()))


def warmup_trains_d(train, warm: int, step: int, has_d: bool) -> bool:
    """Whether warmup step ``step`` (from 0) rolls out and trains D (else it is plain SeqKD): every step before
    G learns, then every ``d_warmup_every``-th step, only in the last ``d_warmup_last`` if set. A fixed reward
    (``has_d`` false) learns nothing from samples. The whole-run estimate counts steps with this too."""
    if not has_d:
        return False
    if step + 1 < train.critic_warmup:
        return True
    if train.d_warmup_last is not None and step < warm - train.d_warmup_last:
        return False
    return step % train.d_warmup_every == 0


def stage_warmup(t, step: int, examples: list, b, timer) -> dict:
    if b is None:  # this warmup step is plain SeqKD (d_learns_in_warmup is false)
        return stage_seqkd(t, step, examples, None, timer)
    m = dict(b.metrics)
    with timer("d_update"):
        m.update(t.reward.update(b))
    if g_learns(t, step):
        with timer("g_update"):
            m.update(t.policy.sft_update([u[0] for u in b.d_units]))
        with timer("sync"):
            m.update(t.policy.sync(step))
    m["tokens"] = b.tokens
    return m


def stage_gad(t, step: int, examples: list, b, timer) -> dict:
    cfg, n, g = t.cfg, t.cfg.rollout.n, t.policy
    m = dict(b.metrics)
    one_pass = g_learns(t, step) and g.one_pass(t.reward)  # the update's forward gives the old logprobs
    if not one_pass:
        with timer("old_logprobs"):
            g.logprobs(b.students, "old_logp")
    with timer("ref_logprobs"):
        g.reference_logprobs(b.students)
    with timer("d_scores"):
        sc = t.reward.score(b)
    m.update(sc.metrics)
    rewards = truncated_rewards(sc.rewards, b.truncated, n, cfg.algo.truncated_reward)
    adv = grpo_advantages(rewards, n, cfg.algo.adv_eps, std_mode=cfg.algo.adv_std,
                          std_floor=cfg.algo.adv_std_floor)
    if sc.sequence_weight != 1.0:
        adv = adv * sc.sequence_weight
    for j, s in enumerate(b.students):
        s.advantage = float(adv[b.first * n + j])
        if sc.token_advantages is not None:
            s.per_token["token_adv"] = sc.token_advantages[j]
    if not one_pass:
        m.update(logprob_gap(b.students))
    if sc.token_advantages is not None:
        m.update(advantage_parts(b.students))
    m.update(reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
             reward_teacher_mean=sc.teacher.mean().item())
    with timer("d_update"):
        m.update(t.reward.update(b))
    if g_learns(t, step):
        with timer("g_update"):
            m.update(g.grpo_update(b.students))
        if one_pass:
            m.update(logprob_gap(b.students))
        with timer("sync"):
            m.update(g.sync(step))
    m["tokens"] = b.tokens
    t.last_samples = [{"prompt_id": e.id, "sample": j, "response": t.tokenizer.decode(gr[j].token_ids, skip_special_tokens=True),
                       "reward": rewards[i * n + j].item(), "advantage": adv[i * n + j].item(), "length": len(gr[j].token_ids)}
                      for i, (e, gr) in enumerate(zip(b.examples, b.groups)) for j in range(n)]
    return m


def logprob_gap(students: list) -> dict:
    """|trainer - rollout engine| logprob of the sampled tokens (mean and max over the world)."""
    pairs = {"logprob_gap_mean": torch.zeros(2, dtype=torch.float64)}
    gap_max = 0.0
    if passes.last_stage_writer():  # the old logprobs are real on the last pipeline stage only
        diffs = torch.cat([(s.per_token["old_logp"] - s.per_token["rollout_logp"]).abs() for s in students])
        pairs["logprob_gap_mean"] = torch.tensor([diffs.double().sum().item(), float(diffs.numel())])
        gap_max = diffs.max().item() if diffs.numel() else 0.0
    m = reduce_pairs(pairs)
    m["logprob_gap_max"] = max_over_world(gap_max)
    return m


def advantage_parts(students: list) -> dict:
    """With a per-token channel: the mean |advantage| per sampled token of each part (the sequence's GRPO one
    and the reward's per-token one) and the per-token part's share of their sum."""
    pairs = {k: torch.zeros(2, dtype=torch.float64) for k in ("adv_seq_abs_mean", "adv_token_abs_mean")}
    if passes.last_stage_writer() and students:
        tok = torch.cat([s.per_token["token_adv"] for s in students]).double()
        seq = torch.cat([torch.full((len(s.response),), abs(s.advantage), dtype=torch.float64) for s in students])
        count = torch.tensor(float(tok.numel()), dtype=torch.float64)
        pairs = {"adv_seq_abs_mean": torch.stack([seq.sum(), count]),
                 "adv_token_abs_mean": torch.stack([tok.abs().sum(), count])}
    m = reduce_pairs(pairs)
    both = m["adv_seq_abs_mean"] + m["adv_token_abs_mean"]
    m["adv_token_share"] = m["adv_token_abs_mean"] / both if both > 0 else 0.0
    return m


STAGES = {"seqkd": stage_seqkd, "warmup": stage_warmup, "gad": stage_gad}


def stage_for(t, step: int) -> str:
    """The name of ``step``'s stage (a key of STAGES)."""
    if t.cfg.train.stage == "seqkd":
        return "seqkd"
    return "warmup" if step < t.schedule.warm else "gad"


def needs_rollout(t, stage: str, step: int) -> bool:
    """Whether the loop samples for this step before the stage runs."""
    return stage == "gad" or (stage == "warmup" and d_learns_in_warmup(t, step))


def run_stage(t, stage: str, step: int, examples: list, timer) -> dict:
    """One step of ``stage``: G samples the step's rollout when the stage needs one, then the stage runs on it."""
    rollouts = None
    if needs_rollout(t, stage, step):
        with timer("rollout"):
            rollouts = t.policy.rollout(step, examples)
    return STAGES[stage](t, step, examples, rollouts, timer)


def enter_gad_stage(t, sampler) -> None:
    """The GAD stage's own settings (``gad_stage.*``, each null one keeps the warmup's): the batch size and G's
    fresh learning-rate schedule over the GAD steps (its Adam moments stay). At the first GAD step, and when a
    resume lands inside the GAD stage (before the saved schedule and sampler states are read)."""
    if t.cfg.gad_stage.batch_prompts:
        sampler.batch = t.cfg.gad_stage.batch_prompts
    t.policy.enter_gad_stage(t.schedule.total - t.schedule.warm)

