"""Where GRPO's rewards come from: the seam a user extends.

A :class:`Reward` scores the student samples of a rollout batch (and, when it can, the teacher answers) as
:class:`Scores`: a reward per sample, which G turns into GRPO's group advantages, and optionally per-token
advantages added to them (a white-box teacher's logprobs: ``trainer/opd.py``). It learns from the batch if it is
trained (the GAD discriminator is), and names the models a checkpoint must hold for it. ``reward.source``
names one in ``reward_registry.REWARDS`` (or a class of the user's own); a new reward is one class. The trainer calls
``score`` before ``update`` in a GAD step: G's advantages come from the scores taken
*before* the reward model learns from the same batch, as the paper's reference code does.

:class:`DiscriminatorReward` is GAD's: D is a megatron GPT with a scalar head on the last token, trained by the
Bradley-Terry loss ``-log sigmoid(D(teacher) - D(student))`` on groups ``[teacher, student_1..student_n]``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from gad_megatron.data.chat import d_view
from gad_megatron.models.roles import D_ROLE
from gad_megatron.runtime.parallel import comm_device
from gad_megatron.trainer import passes
from gad_megatron.trainer.batching import MicroBatching, Seq
from gad_megatron.trainer.metrics import reduce_pairs, sum_outputs, zero_pairs
from gad_megatron.trainer.steps import BT_LOG_NAMES, bt_step, bt_surrogate_step, bt_terms, score_step


@dataclass
class Scores:
    """What a reward says of a rollout batch. ``rewards`` ``[P*n]`` (the global batch's student samples) and
    ``teacher`` ``[P]``: float64, the same on every rank. ``token_advantages``: per sample of this rank's share
    (``batch.students`` order) a ``[len(response)]`` tensor added to the sample's GRPO advantage at each of its
    tokens (None: none). ``sequence_weight`` scales the GRPO advantages of ``rewards``."""

    rewards: torch.Tensor
    teacher: torch.Tensor
    metrics: dict = field(default_factory=dict)
    token_advantages: Optional[list] = None
    sequence_weight: float = 1.0


@dataclass(frozen=True)
class PlannedModels:
    """The models a reward adds beside G, as the planner budgets them: a trained D, and a local frozen teacher
    (its HF folder; None: none, or one behind a server) that waits in host memory between uses when offloaded."""

    discriminator: bool = False
    teacher: Optional[str] = None
    teacher_offloaded: bool = False


@dataclass
class RewardContext:
    """What a reward is built from (``Reward.build``)."""

    cfg: object
    world: dict
    tokenizer: object
    layout: MicroBatching  # micro-batches: token budget, pad multiple, padded or packed
    discriminator: object = None  # D's TrainEngine when the reward's class says ``uses_discriminator``
    load_frozen: object = None  # path -> frozen model chunks of a GPT on G's parallel state
    schedule: object = None  # build.Schedule: the run's steps (warmup, total)


class Reward:
    """Interface. ``batch`` is a :class:`gad_megatron.trainer.policy.RolloutBatch`; every method is
    collective."""

    uses_discriminator = False  # the trainer builds D (a copy of the student with a scalar head) for it
    reads_old_logprobs = False  # its score reads G's old logprobs: they are computed before it (no one-pass update)

    @classmethod
    def build(cls, ctx: RewardContext) -> "Reward":
        raise NotImplementedError

    @classmethod
    def validate(cls, cfg, bad) -> None:
        """This reward's config rules, before any model is built (``bad(key, why)`` records a problem)."""

    @classmethod
    def scorers(cls, cfg) -> dict:
        """{config key: "module:function" or path} of the scorers it calls (imported before any model is built)."""
        return {}

    @classmethod
    def preflight(cls, cfg, student_dir: str) -> str:
        """Before any model is built, what the files can tell (a teacher's folder and tokenizer): a problem
        naming its key, or ''."""
        return ""

    @classmethod
    def planned_models(cls, cfg) -> "PlannedModels":
        """What the planner budgets beside G for this reward."""
        return PlannedModels(discriminator=cls.uses_discriminator)

    def score(self, batch) -> Scores:
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

    # A reward with a model that reads answers (D) is asked for held-out scores (heldout_d_acc).
    reads_answers = False

    def heldout_scores(self, units: list):
        """Collective (only called when ``reads_answers``): scores of held-out units ``[teacher,
        sample_1..k]`` (this rank's share), flat, on the last pipeline stage; None on the other ranks."""
        raise NotImplementedError


class ReplayBuffer:
    """D's memory of past student samples: every group ``[prompt, teacher answer, n x (tokens D saw, in its
    loss)]`` of the global batches of the last ``steps`` steps, oldest first (a FIFO; JSON state in the
    checkpoint). Each step D also trains on ``ratio x P`` groups drawn from it, seeded by the step, so the
    draws are the same at every layout and after a resume; each DP rank takes its contiguous share."""

    def __init__(self, steps: int, ratio: float, seed: int):
        self.steps, self.ratio, self.seed = steps, ratio, seed
        self.fifo: list = []  # per step: [[prompt, teacher, [[tokens, in_d_loss], ...]], ...]

    def push(self, groups: list) -> None:
        self.fifo = (self.fifo + [groups])[-self.steps :]

    def draw(self, step: int, n_prompts: int, dp_rank: int, dp: int) -> list:
        pool = [g for groups in self.fifo for g in groups]
        m = min(len(pool), int(round(self.ratio * n_prompts))) // dp * dp
        if m == 0:
            return []
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed * 7919 + step))[:m]
        per = m // dp
        mine = [pool[int(i)] for i in pick[dp_rank * per : (dp_rank + 1) * per]]
        return [[Seq(p, teacher, is_teacher=True)] + [Seq(p, toks, in_d_loss=bool(k)) for toks, k in samples]
                for p, teacher, samples in mine]

    def state_dict(self) -> dict:
        return {"fifo": self.fifo}

    def load_state_dict(self, state: dict) -> None:
        self.fifo = state.get("fifo", [])


class DiscriminatorReward(Reward):
    """D: scores before its update; learns by BT every ``reward.d_update_every`` steps, with the optional
    replay buffer and balance band (config.RewardSection says why each exists)."""

    reads_answers = True
    uses_discriminator = True

    @classmethod
    def build(cls, ctx: RewardContext) -> "DiscriminatorReward":
        return cls(ctx.discriminator, ctx.cfg.rollout.n, ctx.layout, ctx.cfg, ctx.world, ctx.tokenizer)

    def __init__(self, engine, group_size: int, layout: MicroBatching, cfg, world: dict, tokenizer=None):
        self.d, self.n, self.layout = engine, group_size, layout
        rc = cfg.reward
        self.every = rc.d_update_every
        self.band = list(rc.d_acc_band) if rc.d_acc_band is not None else None
        self.replay = ReplayBuffer(rc.replay_steps, rc.replay_ratio, cfg.train.seed) if rc.replay_steps else None
        self.canonical = rc.canonical_text
        self.world, self.tokenizer = world, tokenizer
        self.last_acc = None
        self._updates = 0  # D's optimizer steps taken through this reward (when cached scores are stale)
        self._scored = None  # (units, _updates, their scores) of the last score()

    def engines(self) -> dict:
        return {D_ROLE: self.d}

    def score(self, batch) -> Scores:
        """D's scores before its update. Each DP replica fills its share of the global batch; one all-reduce."""
        import torch.distributed as dist

        n, n_prompts = self.n, len(batch.examples)
        flat = self._scores(batch.d_units)
        self._scored = (batch.d_units, self._updates, flat)  # the split BT step reuses them (same weights)
        rewards = torch.zeros(n_prompts * n, dtype=torch.float64)
        teacher = torch.zeros(n_prompts, dtype=torch.float64)
        if flat is not None and passes.last_stage_writer():
            g = flat.double().view(-1, n + 1)
            p0 = batch.first
            teacher[p0 : p0 + g.shape[0]] = g[:, 0]
            rewards[p0 * n : (p0 + g.shape[0]) * n] = g[:, 1:].reshape(-1)
        both = torch.cat([rewards, teacher]).to(comm_device())
        dist.all_reduce(both)
        both = both.cpu()
        return Scores(both[: n_prompts * n], both[n_prompts * n :])

    def update(self, batch) -> dict:
        if batch.step % self.every:
            return {}
        if self.band is not None and self.last_acc is not None and self.last_acc > self.band[1]:
            return {"d_band_skipped": 1}  # D is ahead: G gets this step to catch up
        units = batch.d_units
        if self.replay is not None:
            units = units + self.replay.draw(batch.step, len(batch.examples), self.world["dp_rank"],
                                             self.world["data_parallel"])
        m = self._step(units)
        if self.band is not None and m["d_acc"] < self.band[0]:
            m = {**self._step(units), "d_band_extra_step": 1}  # D at chance: one more step before G reads it
        self.last_acc = m["d_acc"]
        if self.replay is not None:
            self.replay.push(self._global_groups(batch))
        return m

    def heldout_scores(self, units: list):
        flat = self._scores(units)
        return flat.double() if flat is not None else None

    def _scores(self, units: list):
        """D's score of every sequence of ``units`` in their order (fp32; last pipeline stage, None elsewhere).
        Groups over the budget are scored sequence by sequence: scoring needs no group together."""
        if not self.layout.fits(units):
            units = [[s] for u in units for s in u]
        out, _ = passes.forward(self.d, units, score_step, self.layout)
        return torch.cat([o["scores"].float() for o in out]) if out is not None else None

    def _step(self, units: list) -> dict:
        if self.layout.fits(units):
            res = passes.update(self.d, units, bt_step(self.n), self.layout)
            pairs = sum_outputs(res["outputs"])
        else:
            res, pairs = self._split_step(units)
        self._updates += 1
        pairs = {**(pairs or zero_pairs(BT_LOG_NAMES)), "d_pad_share": res["pad_pair"]}
        # a bucket with no pair this step has no accuracy (not NaN in the logs)
        m = {k: v for k, v in reduce_pairs(pairs).items() if not (k.startswith("d_acc_") and v != v)}
        m.update(d_grad_norm=res["grad_norm"], d_lr=res["lr"], d_skipped=int(res["skipped"]))
        return m

    def _split_step(self, units: list) -> tuple:
        """BT with groups larger than the micro-batch budget (at the paper's sizes a group of 1 + 8 answers of
        3,584 tokens is 8x a 4,096-token budget): a scoring pass over the sequences, BT's loss and its gradient
        per score from those scores (autograd through :func:`bt_terms`, the loss the whole-group step computes),
        then an update through ``bt_surrogate_step`` with sequences as units. Same gradient; in a GAD step the
        scores are those :meth:`score` took of the same batch with the same weights, so no extra forward (the
        balance band's second step and replayed groups score again). (update result, BT log pairs or {})."""
        seqs = [s for u in units for s in u]
        units_scored, version, flat = self._scored or (None, None, None)
        if units_scored is not units or version != self._updates:  # not the batch score() just took, or D moved
            flat = self._scores(units)
        pairs = {}
        if flat is not None:
            scores = flat.clone().requires_grad_()
            in_loss = torch.tensor([s.in_d_loss for s in seqs])
            lengths = torch.tensor([len(s.response) for s in seqs])
            total, _, pairs = bt_terms(scores, in_loss, lengths, self.n)
            total.backward()
            for s, g in zip(seqs, scores.grad.tolist()):
                s.score_grad = g
        return passes.update(self.d, [[s] for s in seqs], bt_surrogate_step, self.layout), pairs

    def _global_groups(self, batch) -> list:
        return [[list(e.prompt), list(e.response),
                 [[d_view(self.tokenizer, s.token_ids, not s.truncated, self.canonical), int(not s.truncated)] for s in g]]
                for e, g in zip(batch.examples, batch.groups)]

    def state_dict(self) -> dict:
        return {"last_acc": self.last_acc, **({"replay": self.replay.state_dict()} if self.replay else {})}

    def load_state_dict(self, state: dict) -> None:
        self.last_acc = state.get("last_acc")
        if self.replay is not None:
            self.replay.load_state_dict(state.get("replay", {}))


class ScorerError(RuntimeError):
    """A scorer raised, or returned something other than a finite number, on a row (gad-train: one line)."""


def call_scorer(fn, where: str, example, text: str) -> float:
    """``fn(example.messages, text)`` as a float; a scorer that raises or returns anything but a finite number is
    one ScorerError naming ``where`` (the config key and its value), the prompt id and what came back."""
    try:
        v = fn(example.messages, text)
    except Exception as e:  # noqa: BLE001  (a user's scorer: whatever it raises, named with its row)
        raise ScorerError(f"{where} raised {type(e).__name__}: {e} on prompt id {example.id!r}") from e
    x = _as_number(v)
    if x is None or not math.isfinite(x):
        raise ScorerError(f"{where} returned {v!r} for prompt id {example.id!r} (answer {text[:60]!r}): expected a "
                          "finite number")
    return x


def _as_number(v) -> Optional[float]:
    """A scorer's return value as a float: Python numbers, numpy scalars and 0-d arrays / tensors (what scorers
    built on numpy or torch return); None for anything else (a bool, a string, a list, a 1-element vector)."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real):
        return None
    return float(v)


class ScorerReward(Reward):
    """A fixed scorer ``fn(messages, response_text) -> float`` (``reward.scorer``): a rule, an oracle, a
    reward model's client. Called on rank 0 (a remote scorer is asked once), broadcast to every rank."""

    def __init__(self, fn, tokenizer, where: str = "reward.scorer"):
        self.fn, self.tokenizer, self.where = fn, tokenizer, where

    @classmethod
    def build(cls, ctx: RewardContext) -> "ScorerReward":
        spec = ctx.cfg.reward.scorer
        return cls(load_scorer(spec), ctx.tokenizer, f"reward.scorer={spec}")

    @classmethod
    def validate(cls, cfg, bad) -> None:
        if not cfg.reward.scorer or ":" not in cfg.reward.scorer:
            bad("reward.scorer", f"reward.source={cfg.reward.source} needs a scorer: module:function")

    @classmethod
    def scorers(cls, cfg) -> dict:
        return {"reward.scorer": cfg.reward.scorer}

    def score(self, batch) -> Scores:
        dec = self.tokenizer.decode

        def on_rank0():
            students = [call_scorer(self.fn, self.where, e, dec(s.token_ids, skip_special_tokens=True))
                        for e, g in zip(batch.examples, batch.groups) for s in g]
            teacher = [call_scorer(self.fn, self.where, e, dec(e.response, skip_special_tokens=True))
                       for e in batch.examples]
            return students, teacher

        students, teacher = passes.from_rank0(on_rank0)
        return Scores(torch.tensor(students, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64))


class WithDiscriminator(Reward):
    """A reward that adds something to D's (``self.d``): D learns, is checkpointed, reads held-out answers and
    keeps its state as in GAD."""

    reads_answers = True
    uses_discriminator = True

    def engines(self) -> dict:
        return self.d.engines()

    def update(self, batch) -> dict:
        return self.d.update(batch)

    def heldout_scores(self, units: list):
        return self.d.heldout_scores(units)

    def state_dict(self) -> dict:
        return self.d.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.d.load_state_dict(state)


class MixedReward(WithDiscriminator):
    """``w_d x D + w_s x scorer``; D learns as in GAD; both parts are logged."""

    def __init__(self, d: DiscriminatorReward, scorer: ScorerReward, w_d: float, w_s: float):
        self.d, self.scorer, self.w_d, self.w_s = d, scorer, w_d, w_s

    @classmethod
    def build(cls, ctx: RewardContext) -> "MixedReward":
        rc = ctx.cfg.reward
        return cls(DiscriminatorReward.build(ctx), ScorerReward.build(ctx), rc.weight_discriminator, rc.weight_scorer)

    @classmethod
    def validate(cls, cfg, bad) -> None:
        ScorerReward.validate(cfg, bad)
        if cfg.reward.weight_discriminator == 0 and cfg.reward.weight_scorer == 0:
            bad("reward.weight_scorer", "and reward.weight_discriminator are both 0: every reward would be 0")

    @classmethod
    def scorers(cls, cfg) -> dict:
        return ScorerReward.scorers(cfg)

    def score(self, batch) -> Scores:
        d, s = self.d.score(batch), self.scorer.score(batch)
        m = {"reward_d_mean": d.rewards.mean().item(), "reward_scorer_mean": s.rewards.mean().item()}
        return Scores(self.w_d * d.rewards + self.w_s * s.rewards, self.w_d * d.teacher + self.w_s * s.teacher, m)


def load_scorer(spec):
    """``module:function`` (imported from ``sys.path``) or ``path/to/file.py:function`` (that file, relative to
    the working directory) -> the function; None for an empty spec."""
    if not spec:
        return None
    mod, fn = spec.rsplit(":", 1)
    if not (mod.endswith(".py") or os.sep in mod):
        return getattr(importlib.import_module(mod), fn)
    path = os.path.abspath(mod)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such scorer file")
    name = "gad_scorer_" + hashlib.sha256(path.encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is None:
        found = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module  # pickling and repeated loads find it by its name
        found.loader.exec_module(module)
    return getattr(module, fn)
