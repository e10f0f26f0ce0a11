"""The GAD trainer, top to bottom: ``train(cfg)`` = setup, resume, ``for step: stage(...)``, save, log.

Stages (one function each, below):

- ``warmup``  G learns the teacher's answers by cross-entropy (SeqKD) while D learns Bradley-Terry on
  (teacher answer, current student samples). For the first ``train.critic_warmup`` steps only D learns.
- ``gad``     rollout n samples per prompt -> old logprobs (G), reference logprobs, D scores of the student
  samples and the teacher answers -> D update (BT) -> G update (GRPO on the D scores taken *before* D's
  update, as the reference code does) -> weight sync into the rollout engine.
- ``seqkd``   the SFT baseline on the same data (``train.stage=seqkd``): the warmup's G update alone.

Every rank runs this file. G, D and the frozen reference are megatron-core GPT models on one parallel
state; rollouts for the global batch come from one engine (vLLM on global rank 0, or the megatron engine on
every rank) and every data-parallel rank takes its contiguous share of whole prompt groups, so the samples
and everything computed from them are independent of the DP size.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import signal
import time
from types import SimpleNamespace

import torch

from gad_megatron.algo.policy import grpo_advantages
from gad_megatron.data.teacher import DataStats, EpochSampler, read_rows, split_heldout, tokenize_rows
from gad_megatron.rollout.base import SamplingConfig
from gad_megatron.trainer import checkpoint as ckpt_io
from gad_megatron.trainer.batching import Seq, fill_per_token, microbatches
from gad_megatron.trainer.metrics import (
    FailureWatch, RunLog, max_over_world, plot_curves, reduce_pairs, sum_outputs, zero_pairs,
)
from gad_megatron.trainer.steps import bt_step, logprob_step, policy_step, score_step, sft_step

log = logging.getLogger("gad_megatron.train")


# --------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------
def model_hf_dir(path: str) -> str:
    from gad_megatron.convert.api import is_checkpoint
    from gad_megatron.convert.megatron_ckpt import hf_config_dir

    return hf_config_dir(path) if is_checkpoint(path) else path


def load_data(cfg):
    """Tokenizer, train / held-out examples and their stats. Runs before any model or process group, so a
    bad row is one error naming its file and line."""
    from transformers import AutoTokenizer

    tok_dir = cfg.data.tokenizer or model_hf_dir(cfg.model.student)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    stats = DataStats()
    rows = read_rows(cfg.data.train, cfg.data.bad_rows, stats)
    if cfg.data.heldout:
        train_rows, held_rows = rows, read_rows(cfg.data.heldout, cfg.data.bad_rows, DataStats())
    else:
        train_rows, held_rows = split_heldout(rows, cfg.data.heldout_size, cfg.train.seed)
    lim = (cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, cfg.data.overlong)
    train = tokenize_rows(train_rows, tokenizer, *lim, stats=stats)
    held = tokenize_rows(held_rows, tokenizer, *lim, stats=DataStats())
    return tokenizer, train, held, stats


def model_options(cfg):
    from gad_megatron.models import ModelOptions

    return ModelOptions(dtype=cfg.model.dtype, transformer_impl=cfg.model.transformer_impl, fp8=cfg.model.fp8,
                        fp8_recipe=cfg.model.fp8_recipe, recompute_granularity=cfg.model.recompute_granularity,
                        sequence_parallel=cfg.parallel.sequence_parallel)


def optim_config(section, use_dist_opt: bool, total_steps: int):
    from gad_megatron.trainer.engine import OptimConfig

    return OptimConfig(lr=section.lr, min_lr=section.min_lr, schedule=section.schedule,
                       lr_warmup_steps=section.lr_warmup_steps, weight_decay=section.weight_decay,
                       adam_beta1=section.adam_beta1, adam_beta2=section.adam_beta2, adam_eps=section.adam_eps,
                       clip_grad=section.clip_grad, use_distributed_optimizer=use_dist_opt, total_steps=total_steps)


def build(cfg, world: dict, total_steps: int):
    """G (+ D and the frozen reference for GAD) on the one parallel state, and the rollout engine."""
    from gad_megatron.convert.api import load_model
    from gad_megatron.trainer.engine import TrainEngine

    opts = model_options(cfg)
    dist_opt = cfg.parallel.use_distributed_optimizer
    arch, g_chunks, hf_dir = load_model(cfg.model.student, "student", opts)
    t = SimpleNamespace(cfg=cfg, world=world, arch=arch, hf_dir=hf_dir, engine=None, sync=None, d=None, ref=None)
    t.g = TrainEngine(g_chunks, optim_config(cfg.g_optim, dist_opt, total_steps))
    if cfg.train.stage == "gad":
        torch.manual_seed(cfg.train.seed + 17)  # the fresh D head is the same at every layout
        _, d_chunks, _ = load_model(cfg.model.discriminator or cfg.model.student, "discriminator", opts,
                                    head_init=cfg.model.d_head_init)
        t.d = TrainEngine(d_chunks, optim_config(cfg.d_optim, dist_opt, total_steps))
        _, t.ref, _ = load_model(cfg.model.student, "student", opts)
        for c in t.ref:
            c.eval()
            c.requires_grad_(False)
        offload(t, "cpu")
    t.engine = make_engine(cfg, t)
    return t


def offload(t, where: str) -> None:
    """The frozen reference lives in host memory between uses when ``model.offload_reference`` (GPU)."""
    if t.ref is None or not (t.cfg.model.offload_reference and torch.cuda.is_available()):
        return
    for c in t.ref:
        c.to("cpu" if where == "cpu" else torch.cuda.current_device())


def make_engine(cfg, t):
    """The rollout engine: vLLM on global rank 0 (colocated), or the trainer's own megatron GPT."""
    import torch.distributed as dist

    from gad_megatron.rollout.megatron_engine import MegatronEngine
    from gad_megatron.rollout.weight_sync import WeightSync

    if cfg.train.stage != "gad":
        return MegatronEngine(t.g.modules)  # held-out generation only
    if cfg.rollout.engine == "megatron":
        return MegatronEngine(t.g.modules)
    engine = None
    if dist.get_rank() == 0:
        if cfg.rollout.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from gad_megatron.rollout.vllm_engine import VLLMConfig, VLLMEngine

        kv = cfg.rollout.kv_cache_gb
        has_weights = any(f.endswith(".safetensors") for f in os.listdir(t.hf_dir))
        engine = VLLMEngine(VLLMConfig(
            model=t.hf_dir, dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.model.dtype],
            tensor_parallel_size=cfg.rollout.vllm_tensor_parallel,
            max_model_len=cfg.data.max_prompt_tokens + cfg.data.max_response_tokens,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            kv_cache_memory_bytes=int(kv * 1024**3) if kv is not None else None, seed=cfg.train.seed,
            transport=cfg.rollout.transport, colocated=cfg.rollout.colocated,
            enable_sleep_mode=cfg.rollout.colocated and cfg.rollout.sleep_between_rollouts,
            # A checkpoint's hf/ has config + tokenizer only: start from dummy weights, the first sync fills them.
            load_format="auto" if has_weights else "dummy"))
    t.sync = WeightSync(t.g.modules, engine, t.arch, bucket_mb=cfg.rollout.bucket_mb, stop_gap=cfg.rollout.stop_gap)
    return engine


# --------------------------------------------------------------------------------------------------------
# Pieces of a step
# --------------------------------------------------------------------------------------------------------
def sampling_for(cfg, step: int, tokenizer) -> SamplingConfig:
    return SamplingConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_tokens or cfg.data.max_response_tokens,
                          stop_token_ids=[tokenizer.eos_token_id], seed=cfg.train.seed * 100003 + step)


def generate(t, prompts: list, sampling: SamplingConfig) -> list:
    """Collective: ``[[(token_ids, logprobs, finish_reason)] * n] * len(prompts)``, the same on every rank."""
    import torch.distributed as dist

    if getattr(t.engine, "collective", False):
        groups = t.engine.generate(prompts, sampling)  # every rank, same seed: the same samples everywhere
        return [[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in groups]
    box = [None]
    if dist.get_rank() == 0:
        box = [[[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in t.engine.generate(prompts, sampling)]]
        t.engine.sleep()  # GPU, colocated: memory back to training until the next sync wakes it (no-op on CPU)
    dist.broadcast_object_list(box, src=0)
    return box[0]


def pad_multiple(t) -> int:
    return t.world["tp"] if t.cfg.parallel.sequence_parallel else 1


def forward(t, model, units: list, step_fn) -> tuple:
    """Forward only over packed units of ``model`` (a TrainEngine or frozen chunks); returns (outputs on the
    last stage or None elsewhere, the Seq lists per micro-batch)."""
    from megatron.core import parallel_state as ps

    from gad_megatron.models.forward import run_schedule

    mbs, seqs = microbatches(units, t.cfg.train.micro_batch_tokens, pad_multiple(t))
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


def global_scores(t, d_units: list, first_prompt: int, n_global_prompts: int) -> tuple:
    """D scores before its update: (rewards ``[P*n]``, teacher scores ``[P]``) for the global batch, on
    every rank (each DP replica fills its share; one all-reduce)."""
    import torch.distributed as dist

    n = t.cfg.rollout.n
    out, seqs = forward(t, t.d, d_units, score_step)
    rewards = torch.zeros(n_global_prompts * n, dtype=torch.float64)
    teacher = torch.zeros(n_global_prompts, dtype=torch.float64)
    if out is not None and last_stage_writer():
        flat = torch.cat([o["scores"].double() for o in out])
        g = flat.view(-1, n + 1)
        p0 = first_prompt
        teacher[p0 : p0 + g.shape[0]] = g[:, 0]
        rewards[p0 * n : (p0 + g.shape[0]) * n] = g[:, 1:].reshape(-1)
    from gad_megatron.runtime.parallel import comm_device

    both = torch.cat([rewards, teacher]).to(comm_device())
    dist.all_reduce(both)
    both = both.cpu()
    return both[: n_global_prompts * n], both[n_global_prompts * n :]


def d_update(t, d_units: list) -> dict:
    res = update(t.d, d_units, bt_step(t.cfg.rollout.n), t.cfg.train.micro_batch_tokens, pad_multiple(t))
    pairs = sum_outputs(res["outputs"]) or zero_pairs(["d_loss", "d_acc", "teacher_score", "student_score"])
    m = {k: v for k, v in reduce_pairs(pairs).items()}
    m.update(d_grad_norm=res["grad_norm"], d_lr=res["lr"], d_skipped=int(res["skipped"]))
    return m


def g_sft_update(t, teacher_seqs: list) -> dict:
    res = update(t.g, [[s] for s in teacher_seqs], sft_step, t.cfg.train.micro_batch_tokens, pad_multiple(t))
    m = reduce_pairs(sum_outputs(res["outputs"]) or zero_pairs(["sft_loss"]))
    m.update(g_grad_norm=res["grad_norm"], g_lr=res["lr"], g_skipped=int(res["skipped"]))
    return m


def g_grpo_update(t, student_seqs: list) -> dict:
    """PPO mini-batches x epochs over this rank's student samples (whole prompt groups per mini-batch)."""
    cfg = t.cfg
    n, mini = cfg.rollout.n, cfg.algo.ppo_mini_batches
    per = len(student_seqs) // mini
    names = ["g_loss", "pg_loss", "kl", "entropy", "pg_clipfrac", "tis_clipfrac", "ratio"]
    acc, norms, skipped, lr = {}, [], 0, None
    step_fn = policy_step(cfg.rollout.temperature, cfg.algo)
    for _ in range(cfg.algo.ppo_epochs):
        for k in range(mini):
            chunk = student_seqs[k * per : (k + 1) * per]
            assert per % n == 0
            res = update(t.g, [[s] for s in chunk], step_fn, cfg.train.micro_batch_tokens, pad_multiple(t))
            for name, v in (sum_outputs(res["outputs"]) or zero_pairs(names)).items():
                acc[name] = acc.get(name, 0) + v
            norms.append(res["grad_norm"])
            skipped += int(res["skipped"])
            lr = res["lr"]
    m = reduce_pairs(acc)
    m.update(g_grad_norm=sum(norms) / len(norms), g_lr=lr, g_skipped=int(skipped > 0))
    return m


def sync_weights(t, step: int) -> dict:
    if t.sync is None:
        return {}
    t.sync.verify = t.syncs_done == 0 or step % t.cfg.rollout.verify_every == 0
    stats = t.sync.sync()
    t.syncs_done += 1
    out = {}
    if stats is not None and stats.gap_max is not None:
        out = {"sync_gap_mean": stats.gap_mean, "sync_gap_max": stats.gap_max}
    return _broadcast_from0(out)


def _broadcast_from0(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rollout_seqs(t, step: int, examples: list) -> tuple:
    """Rollout of the global batch; returns (groups, this rank's prompts, its student Seqs, its D units,
    index of its first prompt in the global batch, length metrics)."""
    cfg = t.cfg
    groups = generate(t, [e.prompt for e in examples], sampling_for(cfg, step, t.tokenizer))
    mine = _dp_share(t, examples)
    first = t.world["dp_rank"] * len(mine)
    students, d_units = [], []
    for e, g in zip(mine, groups[first : first + len(mine)]):
        teacher = Seq(e.prompt, e.response, is_teacher=True)
        group = [Seq(e.prompt, toks, per_token={"rollout_logp": torch.tensor(lps, dtype=torch.float32)})
                 for toks, lps, _ in g]
        students += group
        d_units.append([teacher] + group)
    lengths = torch.tensor([len(s[0]) for g in groups for s in g], dtype=torch.float64)
    truncated = sum(s[2] == "length" for g in groups for s in g) / max(1, len(lengths))
    m = {"response_length_mean": lengths.mean().item(), "response_length_max": lengths.max().item(),
         "response_truncated_share": truncated,
         "teacher_length_mean": sum(len(e.response) for e in examples) / len(examples)}
    return groups, mine, students, d_units, first, m


# --------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------
def stage_seqkd(t, step: int, examples: list, timer) -> dict:
    mine = _dp_share(t, examples)
    with timer("g_update"):
        m = g_sft_update(t, [Seq(e.prompt, e.response, is_teacher=True) for e in mine])
    m["tokens"] = sum(len(e.prompt) + len(e.response) for e in examples)
    return m


def stage_warmup(t, step: int, examples: list, timer) -> dict:
    cfg = t.cfg
    with timer("rollout"):
        groups, mine, _, d_units, _, m = rollout_seqs(t, step, examples)
    with timer("d_update"):
        m.update(d_update(t, d_units))
    if step >= cfg.train.critic_warmup:
        with timer("g_update"):
            m.update(g_sft_update(t, [u[0] for u in d_units]))
        with timer("sync"):
            m.update(sync_weights(t, step))
    m["tokens"] = _tokens(examples, groups)
    return m


def stage_gad(t, step: int, examples: list, timer) -> dict:
    cfg = t.cfg
    n = cfg.rollout.n
    with timer("rollout"):
        groups, mine, students, d_units, first, m = rollout_seqs(t, step, examples)
    units = [[s] for s in students]
    with timer("old_logprobs"):
        out, seqs = forward(t, t.g, units, logprob_step(cfg.rollout.temperature))
        fill_per_token(seqs, None if out is None else [{"old_logp": o["logp"]} for o in out], "old_logp")
    with timer("ref_logprobs"):
        offload(t, "device")
        out, seqs = forward(t, t.ref, units, logprob_step(cfg.rollout.temperature))
        fill_per_token(seqs, None if out is None else [{"ref_logp": o["logp"]} for o in out], "ref_logp")
        offload(t, "cpu")
    with timer("d_scores"):
        rewards, teacher_scores = global_scores(t, d_units, first, len(examples))
    adv = grpo_advantages(rewards, n, cfg.algo.adv_eps)
    for j, s in enumerate(students):
        s.advantage = float(adv[first * n + j])
    gap_pairs = {"logprob_gap_mean": torch.zeros(2, dtype=torch.float64)}
    gap_max = 0.0
    if last_stage_writer():  # the old logprobs are real on the last pipeline stage only
        diffs = torch.cat([(s.per_token["old_logp"] - s.per_token["rollout_logp"]).abs() for s in students])
        gap_pairs["logprob_gap_mean"] = torch.tensor([diffs.double().sum().item(), float(diffs.numel())])
        gap_max = diffs.max().item() if diffs.numel() else 0.0
    m.update(reduce_pairs(gap_pairs))
    m["logprob_gap_max"] = max_over_world(gap_max)
    m.update(reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
             reward_teacher_mean=teacher_scores.mean().item())
    with timer("d_update"):
        m.update(d_update(t, d_units))
    if step >= cfg.train.critic_warmup:
        with timer("g_update"):
            m.update(g_grpo_update(t, students))
        with timer("sync"):
            m.update(sync_weights(t, step))
    m["tokens"] = _tokens(examples, groups)
    t.last_samples = [{"prompt_id": e.id, "sample": j, "response": t.tokenizer.decode(g[j][0], skip_special_tokens=True),
                       "reward": rewards[i * n + j].item(), "advantage": adv[i * n + j].item(), "length": len(g[j][0])}
                      for i, (e, g) in enumerate(zip(examples, groups)) for j in range(n)]
    return m


def _dp_share(t, examples):
    return EpochSampler.dp_share(examples, t.world["dp_rank"], t.world["data_parallel"])


def _tokens(examples, groups) -> int:
    return sum((len(e.prompt) + len(e.response)) + sum(len(e.prompt) + len(s[0]) for s in g)
               for e, g in zip(examples, groups))


# --------------------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------------------
def load_scorer(spec):
    if not spec:
        return None
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def evaluate(t, held: list) -> dict:
    """Collective. G's cross-entropy on the held-out teacher answers and, with a scorer, the scorer's mean
    over greedy answers (rollout engine)."""
    if not held:
        return {}
    out, _ = forward(t, t.g, [[Seq(e.prompt, e.response, is_teacher=True)] for e in held], sft_step)
    m = reduce_pairs(sum_outputs(out) or zero_pairs(["sft_loss"]))
    res = {"heldout_ce": m["sft_loss"]}
    scorer = load_scorer(t.cfg.eval.scorer)
    if scorer is not None:
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=t.cfg.eval.max_tokens,
                                stop_token_ids=[t.tokenizer.eos_token_id], seed=0)
        groups = generate(t, [e.prompt for e in held], greedy)
        texts = [t.tokenizer.decode(g[0][0], skip_special_tokens=True) for g in groups]
        res["heldout_score"] = sum(scorer(e.messages, txt) for e, txt in zip(held, texts)) / len(held)
        res["heldout_examples"] = [{"id": e.id, "answer": txt} for e, txt in list(zip(held, texts))[:3]]
    return res


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------
class Timer:
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


def plan_steps(cfg, n_train: int) -> tuple:
    spe = n_train // cfg.train.batch_prompts
    if spe < 1:
        from gad_megatron.data.teacher import DataError

        raise DataError(f"{n_train} training examples is fewer than one batch of train.batch_prompts={cfg.train.batch_prompts}")
    total = cfg.train.total_steps or cfg.train.epochs * spe
    warm = 0 if cfg.train.stage == "seqkd" else (spe if cfg.train.warmup_steps is None else cfg.train.warmup_steps)
    return spe, total, min(warm, total)


def setup(cfg, data=None):
    """Data (checked first; ``data`` when the caller already loaded it), the parallel state, G / D /
    reference and the rollout engine. Returns the trainer namespace every stage function takes."""
    from gad_megatron.models.hf_config import arch_spec_from_dir
    from gad_megatron.runtime import ParallelConfig, initialize

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("gad_megatron").setLevel(logging.INFO)
    tokenizer, train_ex, held, stats = data or load_data(cfg)
    spe, total, warm = plan_steps(cfg, len(train_ex))
    arch0 = arch_spec_from_dir(model_hf_dir(cfg.model.student))
    par = ParallelConfig(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                         cfg.parallel.virtual_pipeline_parallel, 1, cfg.parallel.sequence_parallel,
                         cfg.parallel.device, cfg.train.seed)
    world = initialize(par, arch0.model_dims)
    world["tp"] = cfg.parallel.tensor_parallel
    t = build(cfg, world, total)
    t.tokenizer, t.syncs_done, t.last_samples = tokenizer, 0, []
    t.train_ex, t.held, t.stats = train_ex, held, stats
    t.steps_per_epoch, t.total, t.warm = spe, total, warm
    return t


def train(cfg, data=None) -> dict:
    """Runs the configured training on this rank (every rank calls it). Returns the summary on rank 0."""
    import torch.distributed as dist

    t = setup(cfg, data)
    train_ex, held, stats = t.train_ex, t.held, t.stats
    spe, total, warm = t.steps_per_epoch, t.total, t.warm
    rank = t.world["rank"]
    run_dir = os.path.abspath(cfg.log.run_dir)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(os.path.join(run_dir, STOPPED_MARKER)):
            os.remove(os.path.join(run_dir, STOPPED_MARKER))  # this start is the resume it asked for
        from gad_megatron.trainer.config import to_yaml

        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    sampler = EpochSampler(len(train_ex), cfg.train.batch_prompts, cfg.train.seed, cfg.data.shuffle)
    watch = FailureWatch(cfg)
    counters = {"skipped_steps": 0, "consecutive_skipped": 0, "tokens_seen": 0}
    evals = {}
    start = 0
    ckpt_io.clean_leftovers(ckpt_root)
    roles = {"student": t.g, **({"discriminator": t.d} if t.d is not None else {})}
    resume_root = _resume_root(cfg, ckpt_root)
    resume_step = ckpt_io.latest_step(resume_root, cfg.checkpoint.resume_step) if resume_root else None
    if resume_step is not None:
        st = ckpt_io.load(resume_root, resume_step, roles)
        sampler.load_state_dict(st["sampler"])
        for role, e in roles.items():
            e.scheduler.load_state_dict(st["schedulers"][role])
        watch.load_state_dict(st["watch"])
        counters, evals, start = st["counters"], st["evals"], st["step"]
        if t.ref is not None and start > warm > 0:  # at start == warm the loop makes the reference itself
            from gad_megatron.convert.megatron_ckpt import load_checkpoint

            load_checkpoint(t.ref, os.path.join(resume_root, "reference"))
            if resume_root != ckpt_root and not os.path.isdir(os.path.join(ckpt_root, "reference")):
                _save_reference(t, ckpt_root, warm)
        if rank == 0:
            log.info("resumed from %s at step %d", resume_root, start)
    runlog = RunLog(cfg, run_dir, rank, resumed_step=start)
    if rank == 0 and start == 0:
        with open(os.path.join(run_dir, "data_stats.json"), "w") as f:
            json.dump({"train_examples": len(train_ex), "heldout_examples": len(held), "steps_per_epoch": spe,
                       "total_steps": total, "warmup_steps": warm, **stats.summary()}, f, indent=1)
    with_engine_sync = t.sync is not None
    if with_engine_sync:
        sync_weights(t, start)  # the engine starts from the HF files (or dummy weights): give it G's weights
    if start == 0:
        evals["before"] = evaluate(t, held)
        _log_eval(runlog, 0, "before", evals["before"])

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # finish the step, save, exit cleanly (Slurm `--signal=USR1@120`)

    # SIGUSR1 only: SIGTERM is how torchrun / srun stop the other ranks when one fails, and must still kill.
    signal.signal(signal.SIGUSR1, on_signal)
    bar = _progress(cfg, rank, total, start)
    step = start
    while step < total:
        timer = Timer()
        t0 = time.perf_counter()
        batch = [train_ex[i] for i in sampler.next_batch()]
        if cfg.train.stage == "seqkd":
            stage, fn = "seqkd", stage_seqkd
        else:
            stage, fn = ("warmup", stage_warmup) if step < warm else ("gad", stage_gad)
            if stage == "gad" and step == warm and warm > 0:
                _start_gad_stage(t, ckpt_root, step, evals, held, runlog)
        m = fn(t, step, batch, timer)
        step += 1
        skipped = m.get("g_skipped", 0) or m.get("d_skipped", 0)
        counters["skipped_steps"] += int(bool(skipped))
        counters["consecutive_skipped"] = counters["consecutive_skipped"] + 1 if skipped else 0
        if counters["consecutive_skipped"] > cfg.train.max_skipped_steps:
            raise FloatingPointError(f"{counters['consecutive_skipped']} steps in a row had non-finite losses or "
                                     f"gradients (train.max_skipped_steps={cfg.train.max_skipped_steps}); stopping")
        step_tokens = m.pop("tokens")
        counters["tokens_seen"] += step_tokens
        m.update(stage=stage, epoch=sampler.epoch, skipped_steps=counters["skipped_steps"],
                 tokens_seen=counters["tokens_seen"])
        if cfg.eval.heldout_every and step % cfg.eval.heldout_every == 0 and step < total:
            m.update({k: v for k, v in evaluate(t, held).items() if k != "heldout_examples"})
        elapsed = time.perf_counter() - t0
        timings = {k: round(v, 4) for k, v in timer.t.items()}
        timings.update(step_seconds=round(elapsed, 4), other=round(elapsed - sum(timer.t.values()), 4),
                       tokens_per_second=round(step_tokens / max(elapsed, 1e-9), 1), peak_mem_gib=_peak_memory_gib())
        for w in watch.check(m):
            if rank == 0:
                log.warning("step %d: %s", step, w)
        runlog.step(step, m, timings)
        if t.last_samples and cfg.log.dump_samples_every and step % cfg.log.dump_samples_every == 0:
            runlog.samples(step, t.last_samples)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{m[k]:.3f}" for k in ("sft_loss", "d_loss", "d_acc", "reward_mean") if k in m})
        last = step == total
        stop_now = _agree(stop["signal"] is not None)
        if step % cfg.checkpoint.save_every == 0 or last or stop_now:
            _save(t, cfg, ckpt_root, step, roles, sampler, watch, counters, evals)
        if stop_now and not last:
            if rank == 0:
                log.warning("signal received: checkpoint at step %d written, exiting", step)
                # The sbatch scripts requeue the job when this marker is there (a finished run removes it).
                with open(os.path.join(run_dir, STOPPED_MARKER), "w") as f:
                    json.dump({"step": step, "signal": int(stop["signal"])}, f)
            runlog.close()
            return {"stopped_at": step}
    if bar is not None:
        bar.close()
    evals["after"] = evaluate(t, held)
    _log_eval(runlog, step, "after", evals["after"])
    runlog.close()
    summary = _finish(t, cfg, run_dir, ckpt_root, evals, stats, step)
    if t.engine is not None and hasattr(t.engine, "shutdown"):
        t.engine.shutdown()
    dist.barrier()
    return summary


STOPPED_MARKER = "stopped.json"


def _peak_memory_gib() -> float:
    """Peak memory of this process so far: the CUDA allocator's peak on GPU, the peak resident set on CPU
    (the largest over ranks is what a layout must fit)."""
    from gad_megatron.trainer.metrics import max_over_world

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 1024**3
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    return round(max_over_world(peak), 3)


def _agree(flag: bool) -> bool:
    """Every rank must take the same save/exit decision, whichever rank got the signal."""
    import torch.distributed as dist

    from gad_megatron.runtime.parallel import comm_device

    x = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item())


def _resume_root(cfg, ckpt_root):
    """Where to resume from: this run's checkpoints (auto), none, or another run's checkpoint directory."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    root = ckpt_root if mode == "auto" else os.path.abspath(mode)
    return root if os.path.isdir(root) else None


def _start_gad_stage(t, ckpt_root, step, evals, held, runlog):
    """End of warmup: the reference becomes the warmed-up student (KL is measured from where GAD starts, as
    when the reference code starts its GAD run from the SeqKD-warmed checkpoint), saved for resumes."""
    with torch.no_grad():
        for ref_c, g_c in zip(t.ref, t.g.modules):
            for p_ref, p_g in zip(ref_c.parameters(), g_c.parameters()):
                p_ref.copy_(p_g)
    _save_reference(t, ckpt_root, step)
    evals["after_warmup"] = evaluate(t, held)
    _log_eval(runlog, step, "after_warmup", evals["after_warmup"])


def _save_reference(t, ckpt_root, step):
    from gad_megatron.convert.megatron_ckpt import save_checkpoint

    save_checkpoint(t.ref, os.path.join(ckpt_root, "reference"), t.hf_dir,
                    {"role": "student", "model_type": t.arch.model_type, "dtype": t.cfg.model.dtype,
                     "note": "GAD reference: the student at the end of warmup"}, iteration=step, overwrite=True)


def _log_eval(runlog, step, name, res):
    if res:
        runlog.step(step, {"eval": name, **{k: v for k, v in res.items() if k != "heldout_examples"}}, {})


def _save(t, cfg, ckpt_root, step, roles, sampler, watch, counters, evals):
    metas = {r: {"role": r, "model_type": t.arch.model_type, "dtype": cfg.model.dtype, "step": step} for r in roles}
    state = {"sampler": sampler.state_dict(), "schedulers": {r: e.scheduler.state_dict() for r, e in roles.items()},
             "watch": watch.state_dict(), "counters": counters, "evals": evals}
    ckpt_io.save(ckpt_root, step, roles, {r: t.hf_dir for r in roles}, metas, json.loads(json.dumps(state)),
                 cfg.checkpoint.keep_last)


def _progress(cfg, rank, total, start):
    if rank != 0 or not cfg.log.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"gad-train ({cfg.train.stage})", dynamic_ncols=True)


def _finish(t, cfg, run_dir, ckpt_root, evals, stats, step) -> dict:
    import torch.distributed as dist

    summary = {"steps": step, "evals": evals, "data": stats.summary()}
    if dist.get_rank() != 0:
        return summary
    if cfg.log.plot:
        summary["curves"] = plot_curves(run_dir)
    if cfg.checkpoint.export_hf_at_end:
        from gad_megatron.convert.api import mcore_to_hf

        out = os.path.join(run_dir, "hf_student")
        mcore_to_hf(os.path.join(ckpt_root, "student"), out, overwrite=True)
        summary["hf_student"] = out
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict) -> str:
    ev = summary["evals"]
    cols = [c for c in ("before", "after_warmup", "after") if ev.get(c)]
    names = {"before": "before", "after_warmup": "SeqKD warmup", "after": "after"}
    lines = ["", "held-out split            " + "".join(f"{names[c]:>16}" for c in cols)]
    for key, label in (("heldout_score", "scorer (higher = better)"), ("heldout_ce", "CE on teacher answers")):
        if any(key in ev[c] for c in cols):
            lines.append(f"{label:<26}" + "".join(f"{ev[c].get(key, math.nan):>16.4f}" for c in cols))
    lines.append(f"steps: {summary['steps']}")
    if summary.get("curves"):
        lines.append(f"curves: {summary['curves']}")
    if summary.get("hf_student"):
        lines.append(f"student (HF): {summary['hf_student']}")
    return "\n".join(lines)

