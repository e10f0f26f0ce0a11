"""What one step will generate, hold and take, said before the first step, and the runs refused because one
step cannot finish. The seconds come from the planner's model (models/steptime.py: FLOPs at an assumed MFU,
memory-bound decode), on the run's device type; the tokens from the training data's own lengths."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from gad_megatron.models.hf_config import arch_spec_from_dir
from gad_megatron.models.params import total_params
from gad_megatron.models.plan_inputs import GPUS, Assumptions, Layout, Workload
from gad_megatron.models.steptime import plan_time
from gad_megatron.rollout.factory import planned_engine
from gad_megatron.runtime.parallel import device_name
from gad_megatron.trainer.config import ConfigError
from gad_megatron.trainer.config_rules import distributed_optimizer, launch_world
from gad_megatron.trainer.reward_registry import reward_class


def layout_and_workload(cfg, mean_prompt_tokens: Optional[int] = None,
                        mean_response_tokens: Optional[int] = None) -> tuple:
    """(Layout, Workload) of a gad-train config; gad-plan reads a config through this too. The mean lengths
    default to the planner's (LMSYS-like) ones when no data is at hand."""
    p, r, m, d, tr = cfg.parallel, cfg.rollout, cfg.model, cfg.data, cfg.train
    lay = Layout(p.tensor_parallel, p.pipeline_parallel, 1, p.sequence_parallel, distributed_optimizer(cfg, launch_world(cfg)),
                 m.recompute_granularity, r.vllm_tensor_parallel, r.colocated, r.sleep_between_rollouts,
                 m.offload_reference, tuple(r.offload), p.grad_reduce_in_bf16)
    lengths = {}
    if mean_prompt_tokens is not None:
        lengths["mean_prompt_tokens"] = mean_prompt_tokens
    if mean_response_tokens is not None:
        lengths["mean_response_tokens"] = mean_response_tokens
    wl = Workload(batch_prompts=tr.batch_prompts, n=r.n, max_prompt_tokens=d.max_prompt_tokens,
                  max_response_tokens=d.max_response_tokens, micro_batch_tokens=tr.micro_batch_tokens,
                  dtype=m.dtype, stage=tr.stage, engine_live_weights=planned_engine(r.engine).live_weights,
                  max_batch_tokens=r.max_batch_tokens, keep_last=cfg.checkpoint.keep_last,
                  export_hf=cfg.checkpoint.export_hf_at_end, gpu_memory_utilization=r.gpu_memory_utilization,
                  kv_cache_gb=r.kv_cache_gb, one_pass=one_pass(cfg), **lengths, **reward_workload(cfg))
    return lay, wl


def reward_workload(cfg) -> dict:
    """The Workload fields of what the reward adds beside G (its class's ``planned_models``): a D, a teacher."""
    planned = reward_class(cfg.reward.source).planned_models(cfg)
    teacher = total_params(arch_spec_from_dir(planned.teacher)) if planned.teacher and cfg.train.stage == "gad" else 0
    return dict(discriminator=planned.discriminator, teacher_params=teacher, teacher_offloaded=planned.teacher_offloaded)


def one_pass(cfg) -> bool:
    """The config's GRPO update computes the old logprobs itself (trainer.policy.Policy.one_pass)."""
    a = cfg.algo
    return (a.one_pass and a.ppo_mini_batches == 1 and a.ppo_epochs == 1
            and not reward_class(cfg.reward.source).reads_old_logprobs)


def device_gpu(device: Optional[str]):
    """The planner's entry for the device the ranks will use (``parallel.device``; unset: cuda when available,
    as the runtime decides). Every rank asks (under srun there is no launching process to ask for them), so
    the name comes from torch, not from a subprocess; an unknown GPU counts as an H100."""
    name = device_name(device)
    if name is None:  # the runtime's own decision: no GPU to compute on
        return GPUS["cpu"]
    for key, gpu in (("h200", "h200"), ("a100", "a100-80gb")):
        if key in name.lower():
            return GPUS[gpu]
    return GPUS["h100-80gb"]


@dataclass
class StepEstimate:
    samples: int  # student samples one step generates (all ranks)
    new_tokens_max: int  # their tokens at most (samples x rollout.max_tokens)
    tokens_held: int  # prompt + answer tokens a step's batch holds (the samples and the teacher rows), at most
    gad_step_s: float
    warmup_step_s: float
    device: str
    mfu: float

    def planner_says(self, seconds: float) -> str:
        return f"the planner's model ({self.device}, MFU {self.mfu}) estimates ~{_human(seconds)}"

    def describe(self, stage: str) -> str:
        if stage == "seqkd":
            return f"one SeqKD step holds up to {self.tokens_held:,} tokens; {self.planner_says(self.gad_step_s)} a step"
        return (f"one GAD step generates {self.samples:,} samples (up to {self.new_tokens_max:,} new tokens) and holds "
                f"up to {self.tokens_held:,} tokens; {self.planner_says(self.gad_step_s)} a GAD step, "
                f"~{_human(self.warmup_step_s)} a warmup step")


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def mean_lengths(examples) -> tuple:
    """(mean prompt tokens, mean answer tokens) of the training examples, each at least 1."""
    n_ex = max(1, len(examples))
    return (max(1, round(sum(len(e.prompt) for e in examples) / n_ex)),
            max(1, round(sum(len(e.response) for e in examples) / n_ex)))


def estimate_step(cfg, arch, examples) -> StepEstimate:
    """The step of this config on this data, as the planner models it (the data's mean prompt and answer
    lengths; the samples' decode runs to the data's mean answer length, its tail to rollout.max_tokens)."""
    lay, wl = layout_and_workload(cfg, *mean_lengths(examples))
    gpu, asm = device_gpu(cfg.parallel.device), Assumptions()

    world = launch_world(cfg)  # under torchrun / srun: the launcher's, not parallel.nproc (#32 item 16)
    t = plan_time(arch, lay, world, wl, gpu, asm)
    batch = max(cfg.train.batch_prompts, cfg.gad_stage.batch_prompts or 0)
    samples = batch * cfg.rollout.n
    max_new = cfg.rollout.max_tokens or cfg.data.max_response_tokens
    held = samples * (cfg.data.max_prompt_tokens + max_new) + batch * (cfg.data.max_prompt_tokens + cfg.data.max_response_tokens)
    return StepEstimate(samples, samples * max_new, held, t["gad_step_s"], t["warmup_step_s"], gpu.name, asm.mfu)


def slurm_seconds_left(env=None) -> Optional[float]:
    """Seconds until this Slurm job's end (SLURM_JOB_END_TIME, set by Slurm >= 23.02), None outside one."""
    env = os.environ if env is None else env
    end = env.get("SLURM_JOB_END_TIME")
    if not end or not end.isdigit() or int(end) == 0:
        return None
    return int(end) - time.time()


def check_step_time(cfg, est: StepEstimate, env=None) -> None:
    """A step estimated beyond ``train.max_step_hours``, or beyond what is left of the Slurm job, never
    reaches its checkpoint: refused with the numbers, before any rank starts."""
    step_s = est.warmup_step_s if cfg.train.stage == "seqkd" else max(est.gad_step_s, est.warmup_step_s)
    what = (f"{est.samples // cfg.rollout.n} prompts x rollout.n={cfg.rollout.n}: {est.samples:,} samples, up to "
            f"{est.new_tokens_max:,} new tokens a step" if cfg.train.stage == "gad" else
            f"train.batch_prompts={cfg.train.batch_prompts}: up to {est.tokens_held:,} tokens a step")
    what += f"; {est.planner_says(step_s)} a step"
    limit = cfg.train.max_step_hours
    if limit is not None and step_s > limit * 3600:
        raise ConfigError(f"{what}, beyond train.max_step_hours={limit}: lower rollout.n, train.batch_prompts or "
                          f"rollout.max_tokens (or raise train.max_step_hours; null: no limit)")
    left = slurm_seconds_left(env)
    if left is not None and step_s > left:
        raise ConfigError(f"{what}, and this Slurm job ends in {_human(max(0.0, left))}: no step could finish and "
                          f"be checkpointed; lower the step's size or ask for a longer job")
