"""Where GRPO's rewards come from: the seam a user extends.

A :class:`Reward` scores the student samples of a rollout batch (and, when it can, the teacher answers),
learns from the batch if it is trained (the GAD discriminator is), and names the models a checkpoint must hold
for it. The trainer calls ``score`` before ``update`` in a GAD step: G's advantages come from the scores taken
*before* the reward model learns from the same batch, as the paper's reference code does.

:class:`DiscriminatorReward` is GAD's: D is a megatron GPT with a scalar head on the last token, trained by the
Bradley-Terry loss ``-log sigmoid(D(teacher) - D(student))`` on groups ``[teacher, student_1..student_n]``.
"""

from __future__ import annotations

import torch

from gad_megatron.trainer import passes
from gad_megatron.trainer.metrics import reduce_pairs, sum_outputs, zero_pairs
from gad_megatron.trainer.steps import bt_step, score_step


class Reward:
    """Interface. ``batch`` is a :class:`gad_megatron.trainer.gad.RolloutBatch`; every method is collective."""

    def score(self, batch) -> tuple:
        """(rewards ``[P*n]`` of the global batch's student samples, teacher scores ``[P]``), float64, the
        same on every rank."""
        raise NotImplementedError

    def update(self, batch) -> dict:
        """Learn from the batch (a trained reward model); returns metrics. A fixed reward returns {}."""
        return {}

    def engines(self) -> dict:
        """{role: TrainEngine} of the models this reward trains (checkpointed with G)."""
        return {}

    def state_dict(self) -> dict:
        """JSON-able state beside the checkpointed models (e.g. a replay buffer)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DiscriminatorReward(Reward):
    def __init__(self, engine, group_size: int, budget: int, pad: int):
        self.d, self.n, self.budget, self.pad = engine, group_size, budget, pad

    def engines(self) -> dict:
        return {"discriminator": self.d}

    def score(self, batch) -> tuple:
        """D's scores before its update. Each DP replica fills its share of the global batch; one all-reduce."""
        import torch.distributed as dist

        from gad_megatron.runtime.parallel import comm_device

        n, n_prompts = self.n, len(batch.examples)
        out, _ = passes.forward(self.d, batch.d_units, score_step, self.budget, self.pad)
        rewards = torch.zeros(n_prompts * n, dtype=torch.float64)
        teacher = torch.zeros(n_prompts, dtype=torch.float64)
        if out is not None and passes.last_stage_writer():
            g = torch.cat([o["scores"].double() for o in out]).view(-1, n + 1)
            p0 = batch.first
            teacher[p0 : p0 + g.shape[0]] = g[:, 0]
            rewards[p0 * n : (p0 + g.shape[0]) * n] = g[:, 1:].reshape(-1)
        both = torch.cat([rewards, teacher]).to(comm_device())
        dist.all_reduce(both)
        both = both.cpu()
        return both[: n_prompts * n], both[n_prompts * n :]

    def update(self, batch) -> dict:
        res = passes.update(self.d, batch.d_units, bt_step(self.n), self.budget, self.pad)
        pairs = sum_outputs(res["outputs"]) or zero_pairs(["d_loss", "d_acc", "teacher_score", "student_score"])
        m = dict(reduce_pairs(pairs))
        m.update(d_grad_norm=res["grad_norm"], d_lr=res["lr"], d_skipped=int(res["skipped"]))
        return m
