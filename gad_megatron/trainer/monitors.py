"""Monitors that act: the guards that stop a run going wrong (``guard.*``) and the best checkpoint by held-out
score (``checkpoint.keep_best``). The warnings that only report live in ``metrics.FailureWatch``."""

from __future__ import annotations

import logging
import os
from typing import Optional

from gad_megatron.trainer.run_checkpoints import save_student_copy

log = logging.getLogger("gad_megatron.train")


def heldout_key(res: dict) -> Optional[str]:
    """The held-out score the monitors watch: the sampled one (what GAD trains) when measured, else greedy."""
    return next((k for k in ("heldout_score_sampled", "heldout_score") if k in res), None)


def guard_stop(t, run, m: dict) -> Optional[str]:
    """Why the run must stop now (the same on every rank: every input is a global metric), or None."""
    g = t.cfg.guard
    if m.get("stage") != "gad":
        return None
    kl = m.get("kl")
    if g.kl_max is not None and kl is not None and kl > g.kl_max:
        return f"KL to the reference {kl:.4f} > guard.kl_max={g.kl_max}"
    if g.stop_on_d_saturation and run.watch.saturated_steps >= t.cfg.log.d_saturation_steps:
        return (f"discriminator saturated: d_acc > {t.cfg.log.d_saturation_acc} for "
                f"{run.watch.saturated_steps} steps (guard.stop_on_d_saturation)")
    key = heldout_key(m)
    start = run.evals.get("after_warmup") or run.evals.get("before") or {}
    if g.heldout_margin is not None and key and key in start and m[key] < start[key] - g.heldout_margin:
        return (f"held-out {key} {m[key]:.4f} fell below the warm start's {start[key]:.4f} - "
                f"guard.heldout_margin={g.heldout_margin}")
    return None


def keep_best(t, run, res: dict) -> None:
    """Collective: G to ``checkpoints/best`` when ``res`` is its best held-out score so far."""
    key = heldout_key(res)
    if not t.cfg.checkpoint.keep_best or key is None:
        return
    if run.best and run.best.get("key") == key and res[key] <= run.best["score"]:
        return

    run.best = {"key": key, "score": res[key], "step": run.step}
    save_student_copy(t, t.g.modules, os.path.join(run.ckpt_root, "best"), run.step,
                      f"best held-out {key} {res[key]:.4f} at step {run.step}")
    if t.world["rank"] == 0:
        log.info("step %d: best held-out %s so far (%.4f): checkpoints/best", run.step, key, res[key])
