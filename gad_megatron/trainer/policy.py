"""G, the student being distilled, as one object: it samples (through the rollout engine), scores its own
samples (old logprobs) and the frozen reference's, learns (SFT on teacher answers, GRPO on its samples), and
keeps a separate rollout engine in step with its weights. Stages call it and the reward, nothing else.

``version`` counts G's optimizer steps: a :class:`RolloutBatch` records the version it was sampled with, so a
stage can tell how far behind the current weights its samples are (0 in this synchronous loop).
Every method is collective over the world.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from gad_megatron.data.chat import d_view
from gad_megatron.data.teacher import EpochSampler
from gad_megatron.rollout.base import RolloutEngine, SamplingConfig
from gad_megatron.runtime import device, on_cuda
from gad_megatron.trainer import passes
from gad_megatron.trainer.batching import MicroBatching, Seq, fill_per_token
from gad_megatron.trainer.metrics import reduce_pairs, sum_outputs, zero_pairs
from gad_megatron.trainer.steps import logprob_step, policy_step, sft_step


@dataclass
class RolloutBatch:
    """One step's rollout: the global batch's samples and this DP rank's share as trainer sequences."""

    step: int
    policy_version: int  # G's optimizer steps when these were sampled
    examples: list  # the global batch (data.teacher.Example)
    groups: list  # per prompt of the global batch: n rollout.base.Sample
    mine: list  # this DP rank's examples: a contiguous share of whole prompt groups
    first: int  # index of this rank's first prompt in the global batch
    students: list = field(default_factory=list)  # this rank's student samples (Seq, rollout logprobs filled)
    d_units: list = field(default_factory=list)  # per prompt of this rank: [teacher Seq, n samples as D sees them]
    metrics: dict = field(default_factory=dict)  # response lengths and truncation of the global batch

    @property
    def truncated(self) -> torch.Tensor:
        """``[P*n]`` bool over the global batch: the sample hit max_tokens without its end token."""
        return torch.tensor([s.truncated for g in self.groups for s in g], dtype=torch.bool)

    @property
    def tokens(self) -> int:
        """Tokens the step processed: teacher answers and student samples with their prompts."""
        return sum((len(e.prompt) + len(e.response)) + sum(len(e.prompt) + len(s.token_ids) for s in g)
                   for e, g in zip(self.examples, self.groups))


def dp_share(world: dict, examples: list) -> list:
    return EpochSampler.dp_share(examples, world["dp_rank"], world["data_parallel"])


def teacher_seq(example) -> Seq:
    return Seq(example.prompt, example.response, is_teacher=True)


class Policy:
    """G (a ``trainer.engine.TrainEngine``), its frozen reference chunks (GAD; None otherwise), the rollout
    engine (None on ranks that do not lead a non-collective one) and the weight sync into it (None when the
    engine samples with G's own weights)."""

    def __init__(self, cfg, world: dict, tokenizer, g, ref: Optional[list] = None, layout: Optional[MicroBatching] = None):
        self.cfg, self.world, self.tokenizer = cfg, world, tokenizer
        self.g, self.ref, self.layout = g, ref, layout
        self.engine: Optional[RolloutEngine] = None
        self.engine_name = ""  # "vllm" | "megatron": what rollout.engine (maybe auto) resolved to
        self.sync_to = None  # rollout.weight_sync.WeightSync, or None
        self.topology = None  # runtime.topology.RolloutTopology of a separate engine (None: one, on rank 0)
        self.offload_reported = False
        self.train_engines = [g]  # G and D (build_trainer): their state leaves the device while an engine is awake
        g.bring_back = self.train_state_back
        self.syncs_done = 0
        self.version = 0

    # -- sampling ----------------------------------------------------------------------------------------
    def sampling(self, step: int) -> SamplingConfig:
        c = self.cfg
        return SamplingConfig(n=c.rollout.n, temperature=c.rollout.temperature, top_p=c.rollout.top_p,
                              top_k=c.rollout.top_k, max_tokens=c.rollout.max_tokens or c.data.max_response_tokens,
                              stop_token_ids=[self.tokenizer.eos_token_id], seed=c.train.seed * 100003 + step)

    def generate(self, prompts: list, sampling: SamplingConfig) -> list:
        """``[[Sample] * n] * len(prompts)`` (rollout.base.Sample), the same on every rank. A
        collective engine samples everywhere; otherwise each engine's leader samples its block of the prompts
        (``runtime.topology``) and the blocks are gathered in prompt order."""
        import torch.distributed as dist

        engine = self.engine
        self.train_state_away(self.cfg.rollout.offload)  # every rank: every GPU of the node hosts an engine worker
        if engine is not None and engine.collective:
            groups = engine.generate(prompts, sampling)  # every rank, same seed: the same samples everywhere
            self.train_state_back()
            return groups
        topo, rank = self.topology, dist.get_rank()
        mine = None
        if engine is not None:
            lo, hi = topo.prompt_range(topo.engine_of(rank), len(prompts)) if topo else (0, len(prompts))
            part = replace(sampling, index_base=sampling.index_base + lo)
            mine = engine.generate(prompts[lo:hi], part) if hi > lo else []
        self.train_state_back()  # the engine sleeps (GPU, colocated; no-op on CPU) and training state returns
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return [g for leader in (topo.leaders if topo else [0]) for g in every[leader]]

    def rollout(self, step: int, examples: list) -> RolloutBatch:
        """n samples per prompt of the global batch, and this rank's share as Seqs (for G and as D sees them)."""
        groups = self.generate([e.prompt for e in examples], self.sampling(step))
        mine = dp_share(self.world, examples)
        first = self.world["dp_rank"] * len(mine)
        b = RolloutBatch(step, self.version, examples, groups, mine, first)
        canonical = self.cfg.reward.canonical_text
        for e, g in zip(mine, groups[first : first + len(mine)]):
            b.students += [Seq(e.prompt, s.token_ids,
                               per_token={"rollout_logp": torch.tensor(s.logprobs, dtype=torch.float32)}) for s in g]
            # A truncated sample has no end: D does not learn from it (its reward is algo.truncated_reward).
            d_group = [Seq(e.prompt, d_view(self.tokenizer, s.token_ids, not s.truncated, canonical),
                           in_d_loss=not s.truncated) for s in g]
            b.d_units.append([teacher_seq(e)] + d_group)
        lengths = torch.tensor([len(s.token_ids) for g in groups for s in g], dtype=torch.float64)
        truncated = sum(s.truncated for g in groups for s in g) / max(1, len(lengths))
        b.metrics = {"response_length_mean": lengths.mean().item(), "response_length_max": lengths.max().item(),
                     "response_truncated_share": truncated,
                     "teacher_length_mean": sum(len(e.response) for e in examples) / len(examples)}
        return b

    # -- logprobs ----------------------------------------------------------------------------------------
    def logprobs(self, seqs: list, key: str = "old_logp", temperature: float = None, chunks=None) -> None:
        """Fills ``per_token[key]`` of every sequence with G's logprobs (or ``chunks``'s, a frozen model of
        the student's shape) at ``temperature`` (default: the rollout's)."""
        temperature = self.cfg.rollout.temperature if temperature is None else temperature
        model_logprobs(self.g if chunks is None else chunks, seqs, key, temperature, self.layout)

    def reference_logprobs(self, seqs: list, temperature: float = None) -> None:
        """``per_token["ref_logp"]``: the frozen reference's (brought to the device for it when offloaded)."""
        self.offload_reference("device")
        self.logprobs(seqs, "ref_logp", temperature, chunks=self.ref)
        self.offload_reference("cpu")

    def offload_reference(self, where: str) -> None:
        """The frozen reference lives in host memory between uses when ``model.offload_reference`` (GPU)."""
        offload_chunks(self.ref, where, self.cfg.model.offload_reference)

    def reference_from_policy(self) -> None:
        """End of warmup: the reference becomes the warmed-up student (KL is measured from where GAD starts,
        as when the reference code starts its GAD run from the SeqKD-warmed checkpoint)."""
        with torch.no_grad():
            for ref_c, g_c in zip(self.ref, self.g.modules):
                for p_ref, p_g in zip(ref_c.parameters(), g_c.parameters()):
                    p_ref.copy_(p_g)

    # -- learning ----------------------------------------------------------------------------------------
    def sft_update(self, teacher_seqs: list) -> dict:
        """One optimizer step of cross-entropy on teacher answers (SeqKD, the warmup)."""
        res = passes.update(self.g, [[s] for s in teacher_seqs], sft_step, self.layout)
        self.version += 1
        m = reduce_pairs({**(sum_outputs(res["outputs"]) or zero_pairs(["sft_loss"])), "g_pad_share": res["pad_pair"]})
        m.update(g_grad_norm=res["grad_norm"], g_lr=res["lr"], g_skipped=int(res["skipped"]))
        return m

    def grpo_update(self, student_seqs: list) -> dict:
        """PPO mini-batches x epochs over this rank's samples (whole prompt groups per mini-batch), each
        sample's advantage its per-sequence one plus its per-token one when the reward gave them."""
        cfg = self.cfg
        n, mini = cfg.rollout.n, cfg.algo.ppo_mini_batches
        per = len(student_seqs) // mini
        assert per % n == 0
        names = ["g_loss", "pg_loss", "kl", "entropy", "pg_clipfrac", "tis_clipfrac", "ratio"]
        acc, norms, skipped, lr = {}, [], 0, None
        step_fn = policy_step(cfg.rollout.temperature, cfg.algo)
        for _ in range(cfg.algo.ppo_epochs):
            for k in range(mini):
                chunk = student_seqs[k * per : (k + 1) * per]
                res = passes.update(self.g, [[s] for s in chunk], step_fn, self.layout)
                self.version += 1
                if "old_logp" not in chunk[0].per_token:  # one pass: the update's own logprobs are the old ones
                    outs = res["outputs"] or None  # the last pipeline stage's; zeros elsewhere (never read there)
                    fill_per_token(res["seqs"], outs and [{"old_logp": o["logp"]} for o in outs], "old_logp")
                pairs = {**(sum_outputs(res["outputs"], names) or zero_pairs(names)), "g_pad_share": res["pad_pair"]}
                for name, v in pairs.items():
                    acc[name] = acc.get(name, 0) + v
                norms.append(res["grad_norm"])
                skipped += int(res["skipped"])
                lr = res["lr"]
        m = reduce_pairs(acc)
        m.update(g_grad_norm=sum(norms) / len(norms), g_lr=lr, g_skipped=int(skipped > 0))
        return m

    def one_pass(self, reward) -> bool:
        """The GRPO update computes the old logprobs itself (one mini-batch, one epoch, a reward that does not
        read them first): no separate forward."""
        a = self.cfg.algo
        return a.one_pass and a.ppo_mini_batches == 1 and a.ppo_epochs == 1 and not reward.reads_old_logprobs

    def enter_gad_stage(self, total_gad_steps: int) -> None:
        """G's fresh learning-rate schedule over the GAD steps (``gad_stage.g_*``; its Adam moments stay)."""
        gs = self.cfg.gad_stage
        if gs.g_lr is not None:
            g = self.g.optim
            self.g.reschedule(replace(g, lr=gs.g_lr, min_lr=g.min_lr if gs.g_min_lr is None else gs.g_min_lr,
                                      schedule=gs.g_schedule or g.schedule, lr_warmup_steps=gs.g_lr_warmup_steps,
                                      total_steps=max(1, total_gad_steps)))

    # -- the rollout engine ------------------------------------------------------------------------------
    def sync(self, step: int) -> dict:
        """G's weights into a separate rollout engine (none when the engine samples with G's own)."""
        if self.sync_to is None:
            return {}
        self.sync_to.verify = self.syncs_done == 0 or step % self.cfg.rollout.verify_every == 0
        # The engine wakes to take the weights: gradients and optimizer state leave first (parameters only after
        # the sync has read them, before the next rollout); they return after that rollout.
        self.train_state_away([k for k in self.cfg.rollout.offload if k != "params"])
        stats = self.sync_to.sync()
        self.syncs_done += 1
        out = {}
        if stats is not None and stats.gap_max is not None:
            out = {"sync_gap_mean": stats.gap_mean, "sync_gap_max": stats.gap_max}
        return passes.broadcast_from0(out)

    def train_state_away(self, kinds) -> None:
        """G's and D's chosen state (``rollout.offload``) to host memory, device storages freed."""
        live = getattr(self.engine, "live_weights", False)  # it samples with G's own parameters: they stay
        freed = sum(e.offload.to_host([k for k in kinds if not (live and k == "params")]) for e in self.train_engines)
        if freed and not self.offload_reported and self.world.get("rank", 0) == 0:
            import logging

            self.offload_reported = True
            logging.getLogger("gad_megatron.train").info(
                "rollout.offload: %.1f MiB of G's and D's %s on host memory while the rollout engine runs",
                freed / 2**20, ", ".join(self.cfg.rollout.offload))

    def train_state_back(self) -> None:
        """The rollout engine sleeps (GPU, colocated), then whatever G and D moved away comes back, bitwise."""
        sleep = getattr(self.engine, "sleep", None)  # an engine without memory to hand back has none
        if sleep is not None:
            sleep()
        for e in self.train_engines:
            e.offload.to_device()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def state_dict(self) -> dict:
        return {"version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.version = int(state.get("version", 0))


def model_logprobs(model, seqs: list, key: str, temperature: float, layout: MicroBatching) -> None:
    """Collective: ``per_token[key]`` of every sequence with ``model``'s logprobs (a TrainEngine or frozen
    chunks: G, the reference, an OPD teacher) at ``temperature``; real on the last pipeline stage."""
    out, mbs = passes.forward(model, [[s] for s in seqs], logprob_step(temperature), layout)
    fill_per_token(mbs, None if out is None else [{key: o["logp"]} for o in out], key)


def offload_chunks(chunks: Optional[list], where: str, enabled: bool) -> None:
    """Frozen chunks (the reference, an OPD teacher) to host memory between uses (``enabled``, on GPU)."""
    if chunks is None or not (enabled and on_cuda()):
        return
    for c in chunks:
        c.to("cpu" if where == "cpu" else device())
