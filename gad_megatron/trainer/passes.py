"""The passes a stage is made of: generate (rollout engine), forward (no grad), update (one optimizer step of
a TrainEngine), G's SFT and GRPO updates, and the weight sync into a separate rollout engine. Every function
is collective over the world; sequences are packed into micro-batches by the token budget."""

from __future__ import annotations

import torch

from gad_megatron.rollout.base import SamplingConfig
from gad_megatron.trainer.batching import Seq, microbatches
from gad_megatron.trainer.metrics import reduce_pairs, sum_outputs, zero_pairs
from gad_megatron.trainer.steps import policy_step, sft_step


def sampling_for(cfg, step: int, tokenizer) -> SamplingConfig:
    return SamplingConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_tokens or cfg.data.max_response_tokens,
                          stop_token_ids=[tokenizer.eos_token_id], seed=cfg.train.seed * 100003 + step)


def generate(engine, prompts: list, sampling: SamplingConfig) -> list:
    """``[[(token_ids, logprobs, finish_reason)] * n] * len(prompts)``, the same on every rank."""
    import torch.distributed as dist

    if getattr(engine, "collective", False):
        groups = engine.generate(prompts, sampling)  # every rank, same seed: the same samples everywhere
        return [[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in groups]
    box = [None]
    if dist.get_rank() == 0:
        box = [[[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in engine.generate(prompts, sampling)]]
        engine.sleep()  # GPU, colocated: memory back to training until the next sync wakes it (no-op on CPU)
    dist.broadcast_object_list(box, src=0)
    return box[0]


def forward(model, units: list, step_fn, budget: int, pad: int) -> tuple:
    """Forward only over packed units of ``model`` (a TrainEngine or frozen chunks); returns (outputs on the
    last stage or None elsewhere, the Seq lists per micro-batch)."""
    from megatron.core import parallel_state as ps

    from gad_megatron.models.forward import run_schedule

    mbs, seqs = microbatches(units, budget, pad)
    chunks = model.chunks if hasattr(model, "chunks") else model
    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = run_schedule(chunks, mbs, step_fn, forward_only=True)
    return (out if ps.is_pipeline_last_stage() else None), seqs


def update(engine, units: list, step_fn, budget: int, pad: int) -> dict:
    mbs, _ = microbatches(units, budget, pad)
    return engine.train_step(mbs, step_fn)


def last_stage_writer() -> bool:
    """One rank per DP replica that holds last-stage outputs (TP rank 0 of the last pipeline stage)."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def g_sft_update(t, teacher_seqs: list) -> dict:
    res = update(t.g, [[s] for s in teacher_seqs], sft_step, t.budget, t.pad)
    m = reduce_pairs(sum_outputs(res["outputs"]) or zero_pairs(["sft_loss"]))
    m.update(g_grad_norm=res["grad_norm"], g_lr=res["lr"], g_skipped=int(res["skipped"]))
    return m


def g_grpo_update(t, student_seqs: list) -> dict:
    """PPO mini-batches x epochs over this rank's student samples (whole prompt groups per mini-batch)."""
    cfg = t.cfg
    n, mini = cfg.rollout.n, cfg.algo.ppo_mini_batches
    per = len(student_seqs) // mini
    assert per % n == 0
    names = ["g_loss", "pg_loss", "kl", "entropy", "pg_clipfrac", "tis_clipfrac", "ratio"]
    acc, norms, skipped, lr = {}, [], 0, None
    step_fn = policy_step(cfg.rollout.temperature, cfg.algo)
    for _ in range(cfg.algo.ppo_epochs):
        for k in range(mini):
            chunk = student_seqs[k * per : (k + 1) * per]
            res = update(t.g, [[s] for s in chunk], step_fn, t.budget, t.pad)
            for name, v in (sum_outputs(res["outputs"]) or zero_pairs(names)).items():
                acc[name] = acc.get(name, 0) + v
            norms.append(res["grad_norm"])
            skipped += int(res["skipped"])
            lr = res["lr"]
    m = reduce_pairs(acc)
    m.update(g_grad_norm=sum(norms) / len(norms), g_lr=lr, g_skipped=int(skipped > 0))
    return m


def sync_weights(t, step: int) -> dict:
    """G's weights into a separate rollout engine (none when the engine runs on G itself)."""
    if t.sync is None:
        return {}
    t.sync.verify = t.syncs_done == 0 or step % t.cfg.rollout.verify_every == 0
    stats = t.sync.sync()
    t.syncs_done += 1
    out = {}
    if stats is not None and stats.gap_max is not None:
        out = {"sync_gap_mean": stats.gap_mean, "sync_gap_max": stats.gap_max}
    return broadcast_from0(out)


def broadcast_from0(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(*flags: bool):
    """Each flag true on every rank when it is true on any (save / exit decisions every rank must take
    together), in one all-reduce; one flag in, one bool out."""
    import torch.distributed as dist

    from gad_megatron.runtime.parallel import comm_device

    x = torch.tensor([1.0 if f else 0.0 for f in flags], device=comm_device())
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    out = [bool(v) for v in x.tolist()]
    return out[0] if len(out) == 1 else out


def teacher_seq(example) -> Seq:
    return Seq(example.prompt, example.response, is_teacher=True)
