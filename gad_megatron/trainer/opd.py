"""White-box on-policy distillation (OPD), and GAD + OPD.

When the teacher's weights exist and it shares the student's tokenizer, the teacher's logprob of every token
G sampled is a dense signal: the per-token reverse KL ``log pi_G(y_t) - log pi_T(y_t)`` (its k1 estimate)
on G's own samples, minimised by a policy gradient with advantage ``teacher_logp - old_logp`` per token
(slime's and NeMo-RL's OPD advantage), detached, clamped to ``+- opd.adv_clamp`` and times ``opd.coef``.

- ``reward.source=opd``: that advantage alone, through the reward's per-token channel (``Scores``); no D.
- ``reward.source=gad+opd``: ``opd.weight_discriminator x GRPO(D) + w_opd x OPD`` per token, ``w_opd`` from
  ``opd.weight`` going linearly to ``opd.weight_final`` over the GAD steps (a function of the step: a resume
  lands on the same weight); D keeps learning Bradley-Terry as in GAD.

The teacher is a frozen megatron GPT (``opd.teacher``: an HF folder or a gad-convert checkpoint) built on G's
parallel state, so TP / PP / DP layouts see the same numbers; it may be larger than the student, and its
embedding may have padded rows beyond the tokenizer (Qwen2.5-3B has 151,936 rows, 7B / 14B 152,064).
"""

from __future__ import annotations

import torch

from gad_megatron.algo.policy import low_var_kl
from gad_megatron.trainer import passes
from gad_megatron.trainer.batching import fill_per_token
from gad_megatron.trainer.metrics import reduce_pairs
from gad_megatron.trainer.policy import offload_chunks
from gad_megatron.trainer.rewards import DiscriminatorReward, Reward, RewardContext, Scores
from gad_megatron.trainer.steps import logprob_step


class TeacherMismatch(ValueError):
    """The teacher cannot score the student's tokens (another tokenizer, too few embedding rows)."""


def opd_advantages(old_logp: torch.Tensor, teacher_logp: torch.Tensor, coef: float = 1.0,
                   clamp: float = 10.0, mask: torch.Tensor = None) -> torch.Tensor:
    """Per-token OPD advantage ``coef x clamp(teacher_logp - old_logp, -clamp, clamp)``, detached; 0 where
    ``mask`` is 0 (prompt, padding)."""
    adv = (teacher_logp.detach() - old_logp.detach()).clamp(-clamp, clamp) * coef
    return adv if mask is None else adv * mask.to(adv.dtype)


def check_teacher(student_dir: str, teacher_dir: str) -> None:
    """Before any model is built: the teacher reads the student's tokens as the same tokens. Compares the two
    tokenizers' token maps and end tokens; the teacher's embedding may have more rows than its tokenizer
    (padding), not fewer than the student's token ids. Raises TeacherMismatch in one line."""
    from transformers import AutoTokenizer

    from gad_megatron.models.hf_config import arch_spec_from_dir

    st, te = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    sv, tv = st.get_vocab(), te.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:3]
        moved = [k for k in sv if k in tv and sv[k] != tv[k]][:3]
        raise TeacherMismatch(
            f"opd.teacher={teacher_dir}: its tokenizer differs from the student's ({len(tv):,} vs {len(sv):,} "
            f"tokens; only the student's: {only_s}; other ids: {moved}): OPD needs the student's tokenizer "
            "(use reward.source=discriminator for a teacher with another one)")
    if st.eos_token_id != te.eos_token_id:
        raise TeacherMismatch(f"opd.teacher={teacher_dir}: end token {te.eos_token_id} differs from the "
                              f"student's {st.eos_token_id}")
    rows = arch_spec_from_dir(teacher_dir).vocab_size
    if rows < max(sv.values()) + 1:
        raise TeacherMismatch(f"opd.teacher={teacher_dir}: {rows:,} embedding rows cannot hold the student's token "
                              f"ids up to {max(sv.values()):,}")


class OPDReward(Reward):
    """The teacher's per-token advantages on G's samples; rewards are all 0 (no sequence-level signal)."""

    def __init__(self, teacher: list, cfg, budget: int, pad: int):
        self.teacher, self.cfg, self.budget, self.pad = teacher, cfg, budget, pad
        o = cfg.opd
        self.temperature = cfg.rollout.temperature if o.teacher_temperature is None else o.teacher_temperature
        self.coef, self.clamp = o.coef, o.adv_clamp

    @classmethod
    def build(cls, ctx: RewardContext) -> "OPDReward":
        teacher = ctx.load_frozen(ctx.cfg.opd.teacher)
        offload_chunks(teacher, "cpu", ctx.cfg.opd.offload_teacher)
        return cls(teacher, ctx.cfg, ctx.budget, ctx.pad)

    def teacher_logprobs(self, seqs: list) -> None:
        """Collective: ``per_token["teacher_logp"]`` of every sequence (real on the last pipeline stage)."""
        offload_chunks(self.teacher, "device", self.cfg.opd.offload_teacher)
        out, mbs = passes.forward(self.teacher, [[s] for s in seqs], logprob_step(self.temperature), self.budget,
                                  self.pad)
        fill_per_token(mbs, None if out is None else [{"teacher_logp": o["logp"]} for o in out], "teacher_logp")
        offload_chunks(self.teacher, "cpu", self.cfg.opd.offload_teacher)

    def score(self, batch) -> Scores:
        """Needs G's old logprobs on ``batch.students`` (the GAD stage fills them first)."""
        students = batch.students
        self.teacher_logprobs(students)
        adv = [opd_advantages(s.per_token["old_logp"], s.per_token["teacher_logp"], self.coef, self.clamp)
               for s in students]
        n_prompts, n = len(batch.examples), self.cfg.rollout.n
        return Scores(torch.zeros(n_prompts * n, dtype=torch.float64), torch.zeros(n_prompts, dtype=torch.float64),
                      opd_metrics(students, adv), token_advantages=adv)


def opd_metrics(students: list, adv: list) -> dict:
    """Reverse KL to the teacher on G's samples (k1 and the never-negative k3, per token), the advantage's
    mean and std, and the mean |teacher - student| logprob gap; over the world (last-stage ranks write)."""
    names = ("opd_kl_k1", "opd_kl_k3", "opd_adv_mean", "opd_adv_sq", "opd_logp_gap")
    pairs = {k: torch.zeros(2, dtype=torch.float64) for k in names}
    if passes.last_stage_writer() and students:
        old = torch.cat([s.per_token["old_logp"] for s in students]).double()
        teacher = torch.cat([s.per_token["teacher_logp"] for s in students]).double()
        a = torch.cat(adv).double()
        count = torch.tensor(float(old.numel()), dtype=torch.float64)
        for k, v in zip(names, (old - teacher, low_var_kl(old, teacher, 1e9), a, a * a, (teacher - old).abs())):
            pairs[k] = torch.stack([v.sum(), count])
    m = reduce_pairs(pairs)
    m["opd_adv_std"] = max(0.0, m.pop("opd_adv_sq") - m["opd_adv_mean"] ** 2) ** 0.5
    return m


class GadOpdReward(Reward):
    """``w_d x GRPO(D) + w_opd(step) x OPD``: D's scores and BT updates as in GAD, the teacher's per-token
    advantages added; both parts' weights and sizes logged."""

    reads_answers = True
    uses_discriminator = True

    def __init__(self, d: DiscriminatorReward, opd: OPDReward, cfg, warm: int, total: int):
        self.d, self.opd, self.cfg, self.warm, self.total = d, opd, cfg, warm, total

    @classmethod
    def build(cls, ctx: RewardContext) -> "GadOpdReward":
        s = ctx.schedule
        return cls(DiscriminatorReward.build(ctx), OPDReward.build(ctx), ctx.cfg, s.warm, s.total)

    def opd_weight(self, step: int) -> float:
        o = self.cfg.opd
        if o.weight_final is None:
            return float(o.weight)
        frac = min(1.0, max(0.0, (step - self.warm) / max(1, self.total - self.warm - 1)))
        return float(o.weight + (o.weight_final - o.weight) * frac)

    def engines(self) -> dict:
        return self.d.engines()

    def score(self, batch) -> Scores:
        sd, so = self.d.score(batch), self.opd.score(batch)
        w = self.opd_weight(batch.step)
        m = {**so.metrics, "opd_weight": w, "reward_d_mean": sd.rewards.mean().item()}
        return Scores(sd.rewards, sd.teacher, m, token_advantages=[w * a for a in so.token_advantages],
                      sequence_weight=self.cfg.opd.weight_discriminator)

    def update(self, batch) -> dict:
        return self.d.update(batch)

    def heldout_scores(self, units: list):
        return self.d.heldout_scores(units)

    def state_dict(self) -> dict:
        return self.d.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.d.load_state_dict(state)
