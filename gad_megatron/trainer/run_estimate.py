"""The whole run, said before it starts (``gad-train --check`` and the first lines of a run): its steps by kind
(plain SeqKD, warmup steps that also roll out and train D, GAD steps), its evaluations, its checkpoint saves, the
time of each part and the disk it takes; a run longer than ``train.max_run_hours`` is refused with the figures.

Step times are the planner's (``models/steptime.py``, via ``step_estimate``): FLOPs and bytes, plus each call's
fixed cost where the device entry has it measured (``plan_inputs.CallCosts``: on CPU a small model's step is
mostly that). An evaluation is modelled as a greedy and a sampled rollout of the held-out prompts plus the
forwards that score them (G's cross-entropy, G and the reference for the KL, D for its accuracy); a save writes a
checkpoint at ``Assumptions.ckpt_write_gbs``. The start (processes, models, engines) is not counted."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from gad_megatron.models.plan_inputs import Assumptions
from gad_megatron.models.steptime import plan_time
from gad_megatron.models.storage import checkpoint_bytes, disk_need_bytes, export_bytes
from gad_megatron.trainer.config import ConfigError
from gad_megatron.trainer.config_rules import launch_world
from gad_megatron.trainer.gad import warmup_trains_d
from gad_megatron.trainer.reward_registry import reward_class
from gad_megatron.trainer.step_estimate import _human, device_gpu, layout_and_workload, mean_lengths, slurm_seconds_left


@dataclass
class RunEstimate:
    steps: dict  # kind -> (count, seconds each): "SeqKD", "warmup with D", "GAD"
    evaluations: int
    eval_s: float
    saves: int
    save_s: float
    disk_peak_gb: float  # the run directory at its fullest (kept checkpoints + the one being written + export)
    written_gb: float  # everything the run writes over its life

    @property
    def total_s(self) -> float:
        return (sum(n * s for n, s in self.steps.values()) + self.evaluations * self.eval_s
                + self.saves * self.save_s)

    def describe(self) -> str:
        parts = [f"{n} {kind} steps x ~{_human(s)}" for kind, (n, s) in self.steps.items() if n]
        parts.append(f"{self.evaluations} evaluations x ~{_human(self.eval_s)}")
        parts.append(f"{self.saves} checkpoint saves x ~{_human(self.save_s)}")
        return (f"the whole run: {'; '.join(parts)}: ~{_human(self.total_s)} (start-up not counted); disk: up to "
                f"{self.disk_peak_gb:.2f} GB at once, {self.written_gb:.1f} GB written in all")


def count_steps(cfg, warm: int, total: int, has_d: bool) -> dict:
    """``{"SeqKD": n, "warmup with D": n, "GAD": n}`` of a schedule (``trainer.gad``'s own rule)."""
    if cfg.train.stage == "seqkd":
        return {"SeqKD": total, "warmup with D": 0, "GAD": 0}
    with_d = sum(warmup_trains_d(cfg.train, warm, s, has_d) for s in range(min(warm, total)))
    return {"SeqKD": min(warm, total) - with_d, "warmup with D": with_d, "GAD": max(0, total - warm)}


def count_evaluations(cfg, warm: int, total: int, heldout: int) -> int:
    if not heldout:
        return 0
    e = cfg.eval
    periodic = (total - 1) // e.heldout_every if e.heldout_every else 0
    after_warmup = int(e.after_warmup and cfg.train.stage == "gad" and 0 < warm < total)
    return int(e.at_start) + after_warmup + periodic + 1


def estimate_run(cfg, arch, train_examples: list, heldout: int, warm: int, total: int) -> RunEstimate:
    lay, wl = layout_and_workload(cfg, *mean_lengths(train_examples))

    gpu, asm, world = device_gpu(cfg.parallel.device), Assumptions(), launch_world(cfg)
    gad = plan_time(arch, lay, world, replace(wl, stage="gad"), gpu, asm)
    sft = plan_time(arch, lay, world, replace(wl, stage="seqkd"), gpu, asm)["gad_step_s"]
    has_d = cfg.train.stage == "gad" and reward_class(cfg.reward.source).reads_answers  # a D is built and trained
    counts = count_steps(cfg, warm, total, has_d)
    seconds = {"SeqKD": sft, "warmup with D": gad["warmup_step_s"], "GAD": gad["gad_step_s"]}
    eval_s = _eval_seconds(arch, lay, world, wl, gpu, asm, cfg.eval, max(1, heldout), has_d)
    ck = checkpoint_bytes(arch, cfg.model.dtype, has_d)
    c = cfg.checkpoint
    saves = total // c.save_every + int(total % c.save_every != 0)
    reference = export_bytes(arch, cfg.model.dtype) if has_d and 0 < warm < total else 0  # saved when GAD begins
    export = export_bytes(arch, cfg.model.dtype) if c.export_hf_at_end else 0
    return RunEstimate(
        steps={k: (counts[k], seconds[k]) for k in counts},
        evaluations=count_evaluations(cfg, warm, total, heldout), eval_s=eval_s,
        saves=saves + int(reference > 0), save_s=_save_seconds(ck, c.async_save, world, asm),
        disk_peak_gb=(disk_need_bytes(arch, cfg.model.dtype, c.keep_last, c.export_hf_at_end, has_d) + reference) / 1e9,
        written_gb=(saves * ck + reference + export) / 1e9)


def _eval_seconds(arch, lay, world: int, wl, gpu, asm, ev_cfg, prompts: int, has_d: bool) -> float:
    """One held-out evaluation (``trainer/heldout.evaluate``): G's cross-entropy on the teacher answers, a greedy
    rollout, then ``eval.samples`` sampled answers a prompt, G's and the reference's logprobs of them (the KL) and
    D's scores (its accuracy): two engine calls, each with its own decode steps."""
    def part(n: int) -> dict:
        w = replace(wl, stage="gad", batch_prompts=prompts, n=n, max_response_tokens=ev_cfg.max_tokens, one_pass=False)
        return plan_time(arch, lay, world, w, gpu, asm)["step_s"]

    greedy = part(1)
    total = greedy["rollout"] + greedy["g_old_logprobs"]  # the cross-entropy forward: one answer a prompt
    if ev_cfg.samples:
        sampled = part(ev_cfg.samples)
        total += sampled["rollout"] + sampled["g_old_logprobs"] + sampled["reference"]
        total += sampled["d_scores"] if has_d else 0.0
    return total


def _save_seconds(ckpt_bytes: float, background: bool, world: int, asm) -> float:
    """What a save holds the steps up: the whole write at the filesystem's rate, or with background saves
    (checkpoint.async_save) each rank's share staged to host memory over PCIe while the writers run on."""
    if background:
        return ckpt_bytes / max(1, world) / (asm.pcie_gbs * 1e9)
    return ckpt_bytes / (asm.ckpt_write_gbs * 1e9)


def check_run_time(cfg, est: RunEstimate, env=None) -> Optional[str]:
    """Raises ConfigError when the run is estimated beyond ``train.max_run_hours``; returns a note when it is
    longer than what is left of the Slurm job (the project's sbatch scripts requeue it: it goes on after)."""
    limit = cfg.train.max_run_hours
    if limit is not None and est.total_s > limit * 3600:
        raise ConfigError(f"{est.describe()}: beyond train.max_run_hours={limit}; shorten the schedule "
                          f"(train.total_steps, eval.heldout_every, eval.max_prompts) or raise the limit (null: none)")
    left = slurm_seconds_left(env)
    if left is not None and est.total_s > left:
        return (f"the run (~{_human(est.total_s)}) is longer than this Slurm job's {_human(max(0.0, left))} left: "
                f"it checkpoints on SIGUSR1 and goes on when the job is requeued")
    return None
