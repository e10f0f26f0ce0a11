"""A run's checkpoints: what the training loop saves (``save_run``) and resumes (``resume``), the checks a
resume makes before any weight is read (the config and data it ran with, the architecture), and the
student-shaped copies (the GAD reference, G's best). The on-disk format is :mod:`gad_megatron.trainer.checkpoint`."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from gad_megatron.convert.api import config_dir
from gad_megatron.convert.megatron_ckpt import hf_config_dir, iter_dir, load_checkpoint, save_checkpoint
from gad_megatron.models.hf_config import arch_spec_from_dir
from gad_megatron.models.roles import D_ROLE
from gad_megatron.trainer import passes
from gad_megatron.trainer.checkpoint import LATEST, _rank, _read_json, latest_step, load, save
from gad_megatron.trainer.config import GADConfig
from gad_megatron.trainer.drift import check_resume_config, data_digest, model_digest
from gad_megatron.trainer.gad import enter_gad_stage

log = logging.getLogger("gad_megatron.checkpoint")


def save_run(t, run) -> None:
    """Collective: G, the reward's models and the run state at ``run.step``."""
    cfg, roles = t.cfg, t.roles
    metas = {r: {"role": r, "model_type": t.arch.model_type, "dtype": cfg.model.dtype, "step": run.step} for r in roles}
    state = {"sampler": run.sampler.state_dict(), "schedulers": {r: e.scheduler.state_dict() for r, e in roles.items()},
             "watch": run.watch.state_dict(), "counters": run.counters, "evals": run.evals, "best": run.best}
    if t.reward is not None:
        state["reward"] = t.reward.state_dict()
    state["policy"] = t.policy.state_dict()

    # What ran, for the next resume to compare with (trainer/drift.py)
    state.update(config=_plain_config(cfg), data_sha256=data_digest(cfg.data.train),
                 heldout_sha256=data_digest(cfg.data.heldout) if cfg.data.heldout else None,
                 teacher_sha256=model_digest(cfg.opd.teacher))
    save(run.ckpt_root, run.step, roles, {r: t.hf_dir for r in roles}, metas, json.loads(json.dumps(state)),
         cfg.checkpoint.keep_last, run.saves)


def resume_root(cfg, ckpt_root: str) -> Optional[str]:
    """Where to resume from: this run's checkpoints (auto), none, or another run's checkpoint directory."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    root = ckpt_root if mode == "auto" else os.path.abspath(mode)
    if mode != "auto" and not os.path.exists(os.path.join(root, LATEST)) and not os.path.isdir(os.path.join(root, "trainer")):
        # asked for by name: never a silent fresh start
        inner = os.path.join(root, "checkpoints")
        hint = f": it is a run directory, its checkpoints are in {inner}" if os.path.isdir(inner) else ""
        raise FileNotFoundError(f"checkpoint.resume={mode}: holds no checkpoint (no {LATEST}){hint}")
    return root if os.path.isdir(root) else None


def resume(t, run) -> None:
    """Collective: loads the newest whole checkpoint (``checkpoint.resume``) into the models and ``run``."""
    root = resume_root(t.cfg, run.ckpt_root)
    # A branch from another run takes the models that run saved; one it did not train (D, branching GAD from
    # a SeqKD run's checkpoints) starts as at a fresh start. This run's own checkpoints must hold every model,
    # unless an accepted change of reward.source brings one the run never trained (#32 item 13: opd -> gad).
    own = root == run.ckpt_root
    new_reward = own and _saved_reward_source(root) not in (None, t.cfg.reward.source)
    roles = {r: e for r, e in t.roles.items()
             if (own and not new_reward) or os.path.isdir(os.path.join(root or "", r))}
    step = latest_step(root, t.cfg.checkpoint.resume_step, tuple(roles)) if root else None
    if step is None:
        return
    check_config_against(t.cfg, root, step, strict=root == run.ckpt_root)  # before any weight is read
    st = load(root, step, roles)
    fresh = [r for r in t.roles if r not in roles]
    if fresh and t.world["rank"] == 0:
        log.info("%s %s: it holds no %s; %s as at a fresh start", "resuming (reward.source changed)" if own else
                 "branching from", root, " / ".join(fresh), "it starts" if len(fresh) == 1 else "they start")
    if t.cfg.train.stage == "gad" and st["step"] > t.schedule.warm:  # (at == warm the loop enters it)

        enter_gad_stage(t, run.sampler)  # its schedule and batch size, before their saved states are read
    run.sampler.load_state_dict(st["sampler"])
    for role, e in roles.items():
        # The schedule's settings from the config (equal to the checkpoint's, or changed on purpose: see
        # check_config_against), its step count from the checkpoint.
        # The optimizer's saved param groups carry the old rates, and the scheduler reads the groups' own.
        for group in e.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = e.scheduler.max_lr, e.scheduler.min_lr
        e.scheduler.override_opt_param_scheduler = True
        e.scheduler.load_state_dict(st["schedulers"][role])
    run.watch.load_state_dict(st["watch"])
    if t.reward is not None:
        t.reward.load_state_dict(st.get("reward", {}))
    t.policy.load_state_dict(st.get("policy", {}))
    run.counters, run.evals, run.step, run.best = st["counters"], st["evals"], st["step"], st.get("best", {})
    if run.best and passes.agree(not os.path.isdir(os.path.join(run.ckpt_root, "best"))):
        if t.world["rank"] == 0:  # deleted (or never copied into a branch): no summary may name it
            log.warning("checkpoints/best (step %d, held-out %s %.4f) is missing: the best is chosen again from "
                        "this run's next evaluation on", run.best["step"], run.best["key"], run.best["score"])
        run.best = {}
    warm, ref_dir = t.schedule.warm, os.path.join(root, "reference")
    if t.ref is not None and run.step > warm:  # at step == warm (> 0) the loop makes the reference itself

        if os.path.isdir(ref_dir):
            load_checkpoint(t.ref, ref_dir)
            if root != run.ckpt_root and not os.path.isdir(os.path.join(run.ckpt_root, "reference")):
                save_reference(t, run.ckpt_root, warm)
        elif fresh:  # GAD branched from a run that trained no D (SeqKD): KL is measured from the branch point
            t.policy.reference_from_policy()
            save_reference(t, run.ckpt_root, run.step)
            if t.world["rank"] == 0:
                log.info("the GAD reference is the student at the branch point (step %d)", run.step)
        elif warm > 0:
            raise FileNotFoundError(f"{ref_dir}: missing: the GAD reference (the student at the end of warmup, "
                                    f"step {warm}) is needed to resume at step {run.step}")
    if t.world["rank"] == 0:
        log.info("resumed from %s at step %d", root, run.step)


def _saved_reward_source(root: str) -> Optional[str]:
    """reward.source of the config the checkpoint ``latest`` names ran with (None: unknown)."""
    try:
        step = int(open(os.path.join(root, LATEST)).read().strip())
        with open(os.path.join(iter_dir(os.path.join(root, "trainer"), step), "state.json")) as f:
            return json.load(f)["config"]["reward"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _default_config() -> dict:
    """Every key at its default (what a checkpoint written before a key existed ran with)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(GADConfig), resolve=False, throw_on_missing=False)


def _plain_config(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def precheck_resume(cfg) -> None:
    """In the launching process, before any rank starts: the config check of the checkpoint a resume would
    take (the ranks check again; this makes a refusal one line rather than a launcher's failure report)."""
    own = os.path.join(os.path.abspath(cfg.log.run_dir), "checkpoints")
    root = resume_root(cfg, own)
    step = latest_step(root, cfg.checkpoint.resume_step, roles=()) if root else None
    if step is not None:
        check_config_against(cfg, root, step, strict=root == own)


def check_config_against(cfg, root: str, step: int, strict: bool = True) -> None:
    """Raises ``drift.ResumeConfigError`` when the config (or the training data's content) differs from what
    the checkpoint ran with in a key a resume may not change; logs the changes it applies. Not ``strict``: a
    new run branching from another run's checkpoint (``checkpoint.resume=<dir>``, e.g. tools/ablate.py's
    variants of one warm start), whose differences are the point: logged, applied."""
    state_file = os.path.join(iter_dir(os.path.join(root, "trainer"), step), "state.json")
    saved = _read_json(state_file)
    old, new = saved.get("config") if isinstance(saved, dict) else None, _plain_config(cfg)
    if not isinstance(saved, dict) or not isinstance(old, (dict, type(None))):
        raise ValueError(f"{state_file}: not a trainer state (its config is a {type(old).__name__}, not a mapping)")
    if old is None and _rank() == 0:
        log.warning("%s records no config: the resume cannot compare this run's settings with the ones it ran with",
                    state_file)
    if old is not None:  # the data's content is compared like a key: a changed file under the same name
        # (the held-out file's too: a rewritten one would change every held-out number without a word)
        # and the OPD teacher folder's identity (#32 item 12: another model under the same path was silent)
        held = data_digest(cfg.data.heldout) if cfg.data.heldout else None
        teacher = model_digest(cfg.opd.teacher)
        old = {**old, "data_sha256": saved.get("data_sha256"), "heldout_sha256": saved.get("heldout_sha256", held),
               "teacher_sha256": saved.get("teacher_sha256", teacher)}
        new = {**new, "data_sha256": data_digest(cfg.data.train), "heldout_sha256": held, "teacher_sha256": teacher}
    check_architecture(cfg, root)
    replay = ((saved.get("reward") or {}).get("replay") or {}).get("fifo")
    n_then = (old or {}).get("rollout", {}).get("n")
    if replay and cfg.reward.replay_steps and n_then is not None and n_then != cfg.rollout.n:
        raise ValueError(f"rollout.n={cfg.rollout.n}: {state_file} holds D's replay buffer of groups of {n_then} "
                         f"samples (reward.replay_steps), which D cannot train on with groups of {cfg.rollout.n}: "
                         "keep rollout.n, or resume with reward.replay_steps=0 (allowed as a change)")
    allow = list(cfg.checkpoint.allow_changes) if strict else ["*"]
    changes = check_resume_config(old, new, allow, f"{root} at step {step}", defaults=_default_config())
    if changes and _rank() == 0:
        log.info("resume applies %d config change(s): %s", len(changes),
                 "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))


# What decides a model's tensor shapes: a checkpoint of another architecture cannot be loaded.
ARCH_FIELDS = ("model_type", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "vocab_size", "tie_word_embeddings", "qkv_bias", "qk_layernorm")


def check_architecture(cfg, root: str) -> None:
    """Before any model is built: the checkpoint's models have the architecture the config's would (a
    mismatch was a 20-frame megatron 'Global shape mismatch' after G, D and the reference were built)."""
    for role, path in (("student", cfg.model.student), (D_ROLE, cfg.model.discriminator or cfg.model.student)):
        saved_dir = hf_config_dir(os.path.join(root, role))
        if not os.path.isfile(os.path.join(saved_dir, "config.json")):
            continue  # not saved (a SeqKD run has no D)
        saved, now = arch_spec_from_dir(saved_dir), arch_spec_from_dir(config_dir(path))
        diff = [f"{k} {getattr(saved, k)} vs {getattr(now, k)}" for k in ARCH_FIELDS if getattr(saved, k) != getattr(now, k)]
        if diff:
            raise ValueError(f"checkpoint.resume: the {role} in {root} is another architecture than {path} "
                             f"({'; '.join(diff)}): resume with the model it was trained from")


def save_reference(t, ckpt_root: str, step: int) -> None:
    """The GAD reference (G at the end of warmup), which a resume after warmup needs."""
    save_student_copy(t, t.ref, os.path.join(ckpt_root, "reference"), step,
                      "GAD reference: the student at the end of warmup")


def save_student_copy(t, chunks, ckpt: str, step: int, note: str) -> None:
    """Collective: a student-shaped model (the reference, G's best) as a gad-convert checkpoint of its own."""
    save_checkpoint(chunks, ckpt, t.hf_dir, {"role": "student", "model_type": t.arch.model_type,
                                             "dtype": t.cfg.model.dtype, "note": note}, iteration=step, overwrite=True)
