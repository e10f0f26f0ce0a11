"""The rules of ``gad-train``'s config past single values (config.validate calls them): rewards and GRPO, the
GAD stage, OPD, what a resume may be told. ``bad(key, why)`` records a problem naming the key."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from gad_megatron.rollout.factory import ENGINES, engine_class
from gad_megatron.trainer.drift import DATA_KEYS
from gad_megatron.trainer.opd import validate_opd_section
from gad_megatron.trainer.reward_registry import reward_class


def _get(cfg, dotted: str):
    return OmegaConf.select(cfg, dotted)


def _is_number(text: str) -> bool:
    try:
        return float(text) == float(text)  # not NaN
    except ValueError:
        return False


def validate_algo(cfg, bad) -> None:
    """The reward, GRPO, GAD-stage and checkpoint rules; ``bad(key, why)`` records a problem."""
    try:
        source = reward_class(cfg.reward.source)
    except ValueError as e:  # an unknown name (the choices are named) or a class of the user's that does not load
        bad("reward.source", str(e))
    else:
        source.validate(cfg, bad)  # each reward owns its rules
    validate_opd_section(cfg, bad)
    if cfg.algo.truncated_reward not in ("min", "score") and not _is_number(cfg.algo.truncated_reward):
        bad("algo.truncated_reward", "use min, score or a number")
    if not cfg.algo.adv_std_floor >= 0:
        bad("algo.adv_std_floor", "must be >= 0")
    if cfg.algo.tis_cap < 1.0:
        bad("algo.tis_cap", "must be >= 1 (a cap below 1 scales every token down)")
    if cfg.algo.dual_clip is not None and cfg.algo.dual_clip <= 1.0:
        bad("algo.dual_clip", "must be > 1")
    for key in ("train.d_warmup_every", "reward.d_update_every"):
        if _get(cfg, key) < 1:
            bad(key, "must be >= 1")
    for key in ("reward.replay_steps", "gad_stage.g_lr_warmup_steps"):
        if _get(cfg, key) < 0:
            bad(key, "must be >= 0")
    if not cfg.reward.replay_ratio > 0:
        bad("reward.replay_ratio", "must be > 0")
    band = cfg.reward.d_acc_band
    if band is not None and not (len(band) == 2 and 0 <= band[0] <= band[1] <= 1):
        bad("reward.d_acc_band", "expected [lo, hi] with 0 <= lo <= hi <= 1")
    for key in ("gad_stage.g_lr", "gad_stage.batch_prompts", "guard.kl_max", "train.d_warmup_last", "train.stop_after"):
        if _get(cfg, key) is not None and not _get(cfg, key) > 0:
            bad(key, "must be > 0 (or null)")
    if cfg.guard.heldout_margin is not None and (cfg.guard.heldout_margin < 0 or not cfg.eval.scorer):
        bad("guard.heldout_margin", "must be >= 0 and needs eval.scorer (the held-out score it watches)")
    gb = cfg.gad_stage.batch_prompts
    if gb is not None and gb > 0 and gb % cfg.algo.ppo_mini_batches:
        bad("gad_stage.batch_prompts", "must be divisible by algo.ppo_mini_batches")
    validate_stage_and_resume(cfg, bad)


def validate_offload(cfg, bad) -> None:
    for kind in cfg.rollout.offload:
        if kind not in ("grads", "optimizer", "params"):
            bad("rollout.offload", f"{kind!r}: use grads, optimizer and / or params")
    if "params" in cfg.rollout.offload and cfg.rollout.engine in ENGINES and engine_class(cfg.rollout.engine).live_weights:
        bad("rollout.offload", f"params cannot leave: the {cfg.rollout.engine} engine samples with G's own parameters")


# what a run writes into log.run_dir and replaces or prunes: an input in there would be overwritten by the run
RUN_OUTPUTS = ("hf_student", "checkpoints")


def validate_inputs_outside_outputs(cfg, bad) -> None:
    """#32 items 8, 15: a model the run reads may not sit in what the run writes (its HF export, its
    checkpoints: rewritten at the end, pruned as it goes), whatever ``checkpoint.resume`` says."""
    run_dir = os.path.abspath(cfg.log.run_dir)
    for key in ("model.student", "model.discriminator", "opd.teacher"):
        value = OmegaConf.select(cfg, key, throw_on_missing=False) if not OmegaConf.is_missing(cfg, key) else None
        if not value:
            continue
        path = os.path.realpath(value)
        for out in RUN_OUTPUTS:
            written = os.path.realpath(os.path.join(run_dir, out))
            if path == written or path.startswith(written + os.sep):
                bad(key, f"sits in this run's own {out} (log.run_dir/{out}), which the run rewrites as it goes: "
                         f"copy it elsewhere or use another log.run_dir")


def validate_stage_and_resume(cfg, bad) -> None:
    rc, gs = cfg.reward, cfg.gad_stage
    if cfg.rollout.top_k != -1 and cfg.rollout.top_k < 1:
        bad("rollout.top_k", "must be -1 (off) or >= 1")
    if gs.g_lr is not None and gs.g_min_lr is not None and gs.g_min_lr > gs.g_lr:
        bad("gad_stage.g_min_lr", "must be <= gad_stage.g_lr")
    if cfg.checkpoint.resume_step is not None and cfg.checkpoint.resume_step < 0:
        bad("checkpoint.resume_step", "must be >= 0 (a saved step) or null (the latest)")
    known = _known_keys(cfg)
    unknown = [k for k in cfg.checkpoint.allow_changes if k != "*" and k not in known and k not in DATA_KEYS]
    if unknown:
        bad("checkpoint.allow_changes", f"names no config key or section: {unknown}")


def _known_keys(cfg) -> set:
    """Every dotted key and section of the (structured) config (``g_optim``, ``g_optim.lr``, ...)."""
    out = set()

    def walk(node, prefix):
        for k, v in node.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                walk(v, prefix + k + ".")

    walk(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False), "")
    return out


def distributed_optimizer(cfg, world: int) -> bool:
    """``parallel.use_distributed_optimizer`` resolved: null is on when the data-parallel size is > 1."""
    p = cfg.parallel
    if p.use_distributed_optimizer is not None:
        return bool(p.use_distributed_optimizer)
    return world // (p.tensor_parallel * p.pipeline_parallel) > 1


def launch_world(cfg) -> int:
    """The ranks this run has: torchrun's WORLD_SIZE, an srun step's task count, or the ranks a plain gad-train
    will start (``parallel.nproc``). The config checks and the step / run estimates all use this."""
    world = os.environ.get("WORLD_SIZE") or (os.environ.get("SLURM_NTASKS") if "SLURM_STEP_NUM_TASKS" in os.environ else None)
    return int(world) if world else cfg.parallel.nproc
