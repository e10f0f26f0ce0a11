"""The GAD stages, top to bottom. Each takes the :class:`~gad_megatron.trainer.build.Trainer`, the step, the
global batch of examples and a timer, and returns the step's metrics (``tokens`` included).

- ``warmup``  G learns the teacher's answers by cross-entropy (SeqKD) while the reward (D) learns
  Bradley-Terry on (teacher answer, current student samples), every ``train.d_warmup_every`` steps (or in the
  last ``train.d_warmup_last``); G learns from step ``train.critic_warmup`` counted from 1 as verl counts.
- ``gad``     rollout n samples per prompt -> old logprobs (G), reference logprobs, reward scores of the
  student samples (taken *before* the reward's update, as the reference code does) -> reward update (D: BT)
  -> G update (GRPO) -> weight sync into the rollout engine.
- ``seqkd``   the SFT baseline on the same data (``train.stage=seqkd``): the warmup's G update alone.

Rollouts for the global batch come from one engine (vLLM on global rank 0, or the megatron engine on every
rank) and every data-parallel rank takes its contiguous share of whole prompt groups, so the samples and
everything computed from them are independent of the DP size. The loop that calls these is ``run.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from gad_megatron.algo.policy import grpo_advantages, truncated_rewards
from gad_megatron.data.chat import d_view
from gad_megatron.data.teacher import EpochSampler
from gad_megatron.trainer import passes
from gad_megatron.trainer.batching import Seq, fill_per_token
from gad_megatron.trainer.build import offload_reference
from gad_megatron.trainer.metrics import max_over_world, reduce_pairs
from gad_megatron.trainer.steps import logprob_step


@dataclass
class RolloutBatch:
    """One step's rollout: the global batch's samples and this DP rank's share as trainer sequences."""

    step: int
    examples: list  # the global batch (data.teacher.Example)
    groups: list  # per prompt of the global batch: n x (token_ids, logprobs, finish_reason)
    mine: list  # this DP rank's examples: a contiguous share of whole prompt groups
    first: int  # index of this rank's first prompt in the global batch
    students: list = field(default_factory=list)  # this rank's student samples (Seq, rollout logprobs filled)
    d_units: list = field(default_factory=list)  # per prompt of this rank: [teacher Seq, n samples as D sees them]
    metrics: dict = field(default_factory=dict)  # response lengths and truncation of the global batch

    @property
    def truncated(self) -> torch.Tensor:
        """``[P*n]`` bool over the global batch: the sample hit max_tokens without its end token."""
        return torch.tensor([s[2] == "length" for g in self.groups for s in g], dtype=torch.bool)

    @property
    def tokens(self) -> int:
        """Tokens the step processed: teacher answers and student samples with their prompts."""
        return sum((len(e.prompt) + len(e.response)) + sum(len(e.prompt) + len(s[0]) for s in g)
                   for e, g in zip(self.examples, self.groups))


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


def dp_share(t, examples: list) -> list:
    return EpochSampler.dp_share(examples, t.world["dp_rank"], t.world["data_parallel"])


def rollout(t, step: int, examples: list) -> RolloutBatch:
    """n samples per prompt of the global batch (collective), and this rank's share as Seqs."""
    groups = passes.generate(t.engine, [e.prompt for e in examples], passes.sampling_for(t.cfg, step, t.tokenizer))
    mine = dp_share(t, examples)
    first = t.world["dp_rank"] * len(mine)
    b = RolloutBatch(step, examples, groups, mine, first)
    canonical = t.cfg.reward.canonical_text
    for e, g in zip(mine, groups[first : first + len(mine)]):
        group = [Seq(e.prompt, toks, per_token={"rollout_logp": torch.tensor(lps, dtype=torch.float32)})
                 for toks, lps, _ in g]
        b.students += group
        # A truncated sample has no end: D does not learn from it (its reward is algo.truncated_reward).
        d_group = [Seq(e.prompt, d_view(t.tokenizer, toks, finish != "length") if canonical else toks,
                       in_d_loss=finish != "length") for toks, _, finish in g]
        b.d_units.append([passes.teacher_seq(e)] + d_group)
    lengths = torch.tensor([len(s[0]) for g in groups for s in g], dtype=torch.float64)
    truncated = sum(s[2] == "length" for g in groups for s in g) / max(1, len(lengths))
    b.metrics = {"response_length_mean": lengths.mean().item(), "response_length_max": lengths.max().item(),
                 "response_truncated_share": truncated,
                 "teacher_length_mean": sum(len(e.response) for e in examples) / len(examples)}
    return b


# --------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------
def stage_seqkd(t, step: int, examples: list, timer) -> dict:
    mine = dp_share(t, examples)
    with timer("g_update"):
        m = passes.g_sft_update(t, [passes.teacher_seq(e) for e in mine])
    m["tokens"] = sum(len(e.prompt) + len(e.response) for e in examples)
    return m


def g_learns(t, step: int) -> bool:
    """verl's ``critic_warmup <= global_step`` with its steps counted from 1: D alone before."""
    return step + 1 >= t.cfg.train.critic_warmup


def d_learns_in_warmup(t, step: int) -> bool:
    c = t.cfg.train
    if not t.reward.engines():  # a fixed reward learns nothing from samples
        return False
    if not g_learns(t, step):
        return True
    if c.d_warmup_last is not None and step < t.schedule.warm - c.d_warmup_last:
        return False
    return step % c.d_warmup_every == 0


def stage_warmup(t, step: int, examples: list, timer) -> dict:
    if not d_learns_in_warmup(t, step):  # this warmup step is plain SeqKD
        return stage_seqkd(t, step, examples, timer)
    with timer("rollout"):
        b = rollout(t, step, examples)
    m = dict(b.metrics)
    with timer("d_update"):
        m.update(t.reward.update(b))
    if g_learns(t, step):
        with timer("g_update"):
            m.update(passes.g_sft_update(t, [u[0] for u in b.d_units]))
        with timer("sync"):
            m.update(passes.sync_weights(t, step))
    m["tokens"] = b.tokens
    return m


def stage_gad(t, step: int, examples: list, timer) -> dict:
    cfg, n = t.cfg, t.cfg.rollout.n
    with timer("rollout"):
        b = rollout(t, step, examples)
    m = dict(b.metrics)
    with timer("old_logprobs"):
        policy_logprobs(t, t.g, b.students, "old_logp")
    with timer("ref_logprobs"):
        reference_logprobs(t, b.students)
    with timer("d_scores"):
        rewards, teacher_scores, reward_metrics = t.reward.score(b)
    m.update(reward_metrics)
    rewards = truncated_rewards(rewards, b.truncated, n, cfg.algo.truncated_reward)
    adv = grpo_advantages(rewards, n, cfg.algo.adv_eps, std_mode=cfg.algo.adv_std, std_floor=cfg.algo.adv_std_floor)
    for j, s in enumerate(b.students):
        s.advantage = float(adv[b.first * n + j])
    m.update(logprob_gap(b.students))
    m.update(reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
             reward_teacher_mean=teacher_scores.mean().item())
    with timer("d_update"):
        m.update(t.reward.update(b))
    if g_learns(t, step):
        with timer("g_update"):
            m.update(passes.g_grpo_update(t, b.students))
        with timer("sync"):
            m.update(passes.sync_weights(t, step))
    m["tokens"] = b.tokens
    t.last_samples = [{"prompt_id": e.id, "sample": j, "response": t.tokenizer.decode(g[j][0], skip_special_tokens=True),
                       "reward": rewards[i * n + j].item(), "advantage": adv[i * n + j].item(), "length": len(g[j][0])}
                      for i, (e, g) in enumerate(zip(b.examples, b.groups)) for j in range(n)]
    return m


def policy_logprobs(t, model, students: list, key: str, temperature: float = None) -> None:
    """Fills ``per_token[key]`` of every student sample with ``model``'s logprobs at ``temperature`` (default:
    the rollout's)."""
    temperature = t.cfg.rollout.temperature if temperature is None else temperature
    out, seqs = passes.forward(model, [[s] for s in students], logprob_step(temperature), t.budget, t.pad)
    fill_per_token(seqs, None if out is None else [{key: o["logp"]} for o in out], key)


def reference_logprobs(t, seqs: list, temperature: float = None) -> None:
    """``per_token["ref_logp"]``: the frozen reference's logprobs (brought to the device for it when offloaded)."""
    offload_reference(t, "device")
    policy_logprobs(t, t.ref, seqs, "ref_logp", temperature)
    offload_reference(t, "cpu")


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


def start_gad(t) -> None:
    """End of warmup: the reference becomes the warmed-up student (KL is measured from where GAD starts, as
    when the reference code starts its GAD run from the SeqKD-warmed checkpoint)."""
    with torch.no_grad():
        for ref_c, g_c in zip(t.ref, t.g.modules):
            for p_ref, p_g in zip(ref_c.parameters(), g_c.parameters()):
                p_ref.copy_(p_g)


def stage_for(t, step: int) -> tuple:
    """(name, stage function) of ``step``."""
    if t.cfg.train.stage == "seqkd":
        return "seqkd", stage_seqkd
    return ("warmup", stage_warmup) if step < t.schedule.warm else ("gad", stage_gad)


def enter_gad_stage(t, sampler) -> None:
    """The GAD stage's own settings (``gad_stage.*``, each null one keeps the warmup's): G's fresh learning-rate
    schedule over the GAD steps (its Adam moments stay), the batch size."""
    gs, g = t.cfg.gad_stage, t.cfg.g_optim
    if gs.batch_prompts:
        sampler.batch = gs.batch_prompts
    if gs.g_lr is not None:
        from gad_megatron.trainer.engine import OptimConfig

        t.g.reschedule(OptimConfig(
            lr=gs.g_lr, min_lr=g.min_lr if gs.g_min_lr is None else gs.g_min_lr, schedule=gs.g_schedule or g.schedule,
            lr_warmup_steps=gs.g_lr_warmup_steps, weight_decay=g.weight_decay,
            total_steps=max(1, t.schedule.total - t.schedule.warm)))
