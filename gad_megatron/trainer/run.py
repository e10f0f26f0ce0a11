"""The training loop, top to bottom: build -> open the run (resume) -> for each step: stage, log, held-out
eval, checkpoint -> final evaluation, summary. Every rank runs it; the stages are in ``gad.py``."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch

from gad_megatron.convert.api import mcore_to_hf
from gad_megatron.data.teacher import EpochSampler
from gad_megatron.runtime import on_cuda
from gad_megatron.runtime.outputs import DirectoryBusy, lock_directory
from gad_megatron.trainer import checkpoint as ckpt_io
from gad_megatron.trainer import passes, run_checkpoints
from gad_megatron.trainer.build import build_trainer
from gad_megatron.trainer.config import to_yaml
from gad_megatron.trainer.gad import Timer, enter_gad_stage, run_stage, stage_for
from gad_megatron.trainer.heldout import evaluate
from gad_megatron.trainer.metrics import FailureWatch, RunLog, max_over_world, plot_curves
from gad_megatron.trainer.monitors import guard_stop, keep_best
from gad_megatron.trainer.progress import Progress

log = logging.getLogger("gad_megatron.train")
STOPPED_MARKER = "stopped.json"  # the sbatch scripts requeue the job while it is there


def train(cfg, data=None) -> dict:
    """Runs the configured training on this rank (every rank calls it). Returns the summary on rank 0."""
    t = build_trainer(cfg, data)
    run = open_run(t)  # run dir, resume, logs, the engine's first sync, the 'before' evaluation
    stop = StopSignal()
    end = run_end(t)
    while run.step < end:
        stage = stage_for(t, run.step)
        if stage == "gad" and run.step == t.schedule.warm:
            begin_gad(t, run)  # before the batch is drawn: the first GAD step has gad_stage.batch_prompts too
        timer, t0 = Timer(), time.perf_counter()
        batch = [t.data.train[i] for i in run.sampler.next_batch()]
        m = run_stage(t, stage, run.step, batch, timer)
        run.step += 1
        run.progress.step(run.step, stage, m, record_step(t, run, stage, m, timer, t0))
        guard = guard_stop(t, run, m)
        last = run.step == end
        stop_now, interrupted = passes.agree(stop.signum is not None, stop.interrupted)
        if run.saves is not None:
            run.saves.poll()  # a background save whose writers are done is published (collective)
        if interrupted:
            if run.saves is not None:
                run.saves.wait()  # what was being written is published: the last checkpoint is whole either way
            raise KeyboardInterrupt  # gad-train says so in one line and exits 130
        if run.step % cfg.checkpoint.save_every == 0 or last or stop_now or guard:
            with run.progress.phase(run.step, "checkpoint", "save"):
                run_checkpoints.save_run(t, run)
        if run.saves is not None and (guard or stop_now or last):
            run.saves.wait()  # the run's last checkpoint is published before anything reads it or the job ends
        if guard:
            return finish(t, run, guard)
        if stop_now and not last:
            return stopped(t, run, stop.signum)
    run.progress.close()
    check_some_update_ran(run.counters, run.step)
    return finish(t, run)


def check_some_update_ran(counters: dict, steps: int) -> None:
    """A run in which every step's update was skipped (non-finite losses or gradients) trained nothing: an
    error, not an exit 0 with a model equal to its start."""
    if steps > 0 and counters["skipped_steps"] >= steps:
        raise FloatingPointError(f"all {steps} steps skipped their update (non-finite losses or gradients): "
                                 "nothing was trained; see metrics.jsonl (skipped_steps)")


@dataclass
class Run:
    """One run's state besides the models (checkpointed: ``checkpoint.save_run`` / ``resume``) and its logs."""

    run_dir: str
    sampler: EpochSampler
    watch: FailureWatch
    counters: dict = field(default_factory=lambda: {"skipped_steps": 0, "consecutive_skipped": 0, "tokens_seen": 0})
    evals: dict = field(default_factory=dict)
    step: int = 0
    best: dict = field(default_factory=dict)  # checkpoint.keep_best: {"key", "score", "step"}
    log: RunLog = None
    progress: Progress = None
    lock: object = None  # the run directory's lock file (rank 0), held for the run's life
    saves: object = None  # checkpoint.BackgroundSaves (checkpoint.async_save)

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")


class StopSignal:
    """SIGUSR1 (Slurm ``--signal=USR1@<lead>``, the lead from gad-plan): finish the step, save, exit cleanly.
    SIGINT (Ctrl-C): finish the step and stop without saving (the last checkpoint is whole); a second Ctrl-C stops at once. Handled here,
    not as KeyboardInterrupt, which would land anywhere (inside a checkpoint write, in its forked workers).
    SIGTERM is how torchrun / srun stop the other ranks when one fails, and must still kill."""

    def __init__(self):
        self.signum, self.interrupted, self.pid = None, False, os.getpid()
        signal.signal(signal.SIGUSR1, self._on_signal)
        signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_signal(self, signum, _frame):
        self.signum = signum

    def _on_interrupt(self, _signum, _frame):
        if os.getpid() != self.pid:
            # A forked helper (megatron's checkpoint writers) gets the group's Ctrl-C too: it finishes its
            # write. Exiting here left the trainer waiting forever for the dead writer's result.
            return
        if self.interrupted:
            os._exit(130)  # the second Ctrl-C
        self.interrupted = True
        if os.environ.get("RANK", "0") == "0":  # said at once: the step (a slow scorer, a rollout) may run on a while
            os.write(2, b"gad-train: Ctrl-C: stopping when this step ends (the last checkpoint is whole); "
                        b"Ctrl-C again to stop now\n")


def open_run(t) -> Run:
    cfg, rank = t.cfg, t.world["rank"]
    run = Run(os.path.abspath(cfg.log.run_dir),
              EpochSampler(len(t.data.train), cfg.train.batch_prompts, cfg.train.seed, cfg.data.shuffle),
              FailureWatch(cfg))
    locked = None
    if rank == 0:
        try:
            run.lock = lock_directory(run.run_dir)  # held until this process ends
        except DirectoryBusy as e:
            locked = str(e)
    if passes.agree(locked is not None):  # every rank stops before touching the directory
        raise SystemExit(f"gad-train: error: {locked or 'the run directory is in use (see rank 0)'}")
    if rank == 0 and os.path.exists(os.path.join(run.run_dir, STOPPED_MARKER)):
        os.remove(os.path.join(run.run_dir, STOPPED_MARKER))  # this start is the resume it asked for
    ckpt_io.clean_leftovers(run.ckpt_root)
    run_checkpoints.resume(t, run)  # refuses a config that differs from the checkpoint's where it may not
    if cfg.checkpoint.async_save:
        run.saves = ckpt_io.BackgroundSaves()
    if rank == 0:  # what runs: written once the resume has accepted it

        os.makedirs(run.run_dir, exist_ok=True)
        with open(os.path.join(run.run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    run.log = RunLog(cfg, run.run_dir, rank, resumed_step=run.step)
    run.progress = Progress(cfg, rank, run_end(t), run.step, run.log)
    if rank == 0 and run.step == 0:
        s = t.schedule
        with open(os.path.join(run.run_dir, "data_stats.json"), "w") as f:
            json.dump({"train_examples": len(t.data.train), "heldout_examples": len(t.data.held),
                       "steps_per_epoch": s.steps_per_epoch, "total_steps": s.total, "warmup_steps": s.warm,
                       **t.data.stats.summary()}, f, indent=1)
    if t.sync is not None:
        t.policy.sync(run.step)  # the engine starts from the HF files (or dummy weights): give it G's
    if run.step == 0 and cfg.eval.at_start:
        log_eval(t, run, "before")
    return run


def begin_gad(t, run: Run) -> None:
    """The first GAD step. After a warmup: the reference becomes the warmed-up student (saved for resumes), and
    it is evaluated (the warm start). Then the GAD stage's own settings."""
    if t.schedule.warm > 0:
        t.policy.reference_from_policy()
        with run.progress.phase(run.step, "checkpoint", "reference"):
            run_checkpoints.save_reference(t, run.ckpt_root, run.step)
        if t.cfg.eval.after_warmup:
            log_eval(t, run, "after_warmup")
    enter_gad_stage(t, run.sampler)


def run_end(t) -> int:
    """The step this launch stops after (``train.stop_after`` cuts the schedule short)."""
    return min(t.schedule.total, t.cfg.train.stop_after or t.schedule.total)


def log_eval(t, run: Run, name: str) -> None:
    with run.progress.phase(run.step, "eval", name):
        run.evals[name] = res = evaluate(t, t.data.held)
        metrics = eval_metrics(run, name, res)
    if res:
        run.log.step(run.step, {"eval": name, **metrics}, {})
    keep_best(t, run, res)


def eval_metrics(run: Run, name: str, res: dict) -> dict:
    """An evaluation's metrics for metrics.jsonl; its per-prompt scores (taken out of ``res``) go to their file."""
    per_prompt = res.pop("heldout_per_prompt", None)
    if per_prompt:
        run.log.heldout(run.step, name, per_prompt)
    return {k: v for k, v in res.items() if k != "heldout_examples"}


def record_step(t, run: Run, stage: str, m: dict, timer: Timer, t0: float) -> float:
    """Counters, the periodic held-out evaluation, timings, monitors; one line each in metrics / timings.
    Returns the step's seconds (an evaluation is booked on its own)."""
    cfg, c = t.cfg, run.counters
    skipped = m.get("g_skipped", 0) or m.get("d_skipped", 0)
    c["skipped_steps"] += int(bool(skipped))
    c["consecutive_skipped"] = c["consecutive_skipped"] + 1 if skipped else 0
    if c["consecutive_skipped"] > cfg.train.max_skipped_steps:
        raise FloatingPointError(f"{c['consecutive_skipped']} steps in a row had non-finite losses or gradients "
                                 f"(train.max_skipped_steps={cfg.train.max_skipped_steps}); stopping")
    step_tokens = m.pop("tokens")
    c["tokens_seen"] += step_tokens
    m.update(stage=stage, epoch=run.sampler.epoch, skipped_steps=c["skipped_steps"], tokens_seen=c["tokens_seen"])
    elapsed = time.perf_counter() - t0
    if cfg.eval.heldout_every and run.step % cfg.eval.heldout_every == 0 and run.step < t.schedule.total:
        with run.progress.phase(run.step, "eval", "periodic"):
            m.update(eval_metrics(run, "periodic", evaluate(t, t.data.held)))
            keep_best(t, run, m)
    timings = {k: round(v, 4) for k, v in timer.t.items()}
    timings.update(step_seconds=round(elapsed, 4), other=round(elapsed - sum(timer.t.values()), 4),
                   tokens_per_second=round(step_tokens / max(elapsed, 1e-9), 1), peak_mem_gib=_peak_memory_gib())
    for w in run.watch.check(m):
        if t.world["rank"] == 0:
            log.warning("step %d: %s", run.step, w)
    run.log.step(run.step, m, timings)
    if t.last_samples and cfg.log.dump_samples_every and run.step % cfg.log.dump_samples_every == 0:
        run.log.samples(run.step, t.last_samples)
    return elapsed


def stopped(t, run: Run, signum: int) -> dict:
    if t.world["rank"] == 0:
        log.warning("signal received: checkpoint at step %d written, exiting", run.step)
        with open(os.path.join(run.run_dir, STOPPED_MARKER), "w") as f:
            json.dump({"step": run.step, "signal": int(signum)}, f)
    run.log.close()
    return {"stopped_at": run.step}


def finish(t, run: Run, guard: str = None) -> dict:
    """The 'after' evaluation, the summary (curves, HF export of G, summary.json) and the engine's shutdown.
    ``guard``: why a guard stopped the run early (also in summary.json)."""
    import torch.distributed as dist

    if guard and t.world["rank"] == 0:
        log.warning("step %d: stopping: %s", run.step, guard)
    log_eval(t, run, "after")
    run.log.close()
    cfg = t.cfg
    summary = {"steps": run.step, "evals": run.evals, "data": t.data.stats.summary(), "rollout_engine": t.policy.engine_name,
               **({"stopped_by_guard": guard} if guard else {}), **({"best": run.best} if run.best else {})}
    if dist.get_rank() == 0:
        if cfg.log.plot:
            summary["curves"] = plot_curves(run.run_dir)
        if cfg.checkpoint.export_hf_at_end:
            out = os.path.join(run.run_dir, "hf_student")
            mcore_to_hf(os.path.join(run.ckpt_root, "student"), out, overwrite=True)
            summary["hf_student"] = out
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(format_summary(summary), flush=True)
    t.policy.shutdown()
    dist.barrier()
    return summary


def format_summary(summary: dict) -> str:
    ev = summary["evals"]
    cols = [c for c in ("before", "after_warmup", "after") if ev.get(c)]
    names = {"before": "before", "after_warmup": "SeqKD warmup", "after": "after"}
    lines = ["", "held-out split            " + "".join(f"{names[c]:>16}" for c in cols)]
    for key, label in (("heldout_score", "scorer, greedy"), ("heldout_score_sampled", "scorer, sampled"),
                       ("heldout_ce", "CE on teacher answers"), ("heldout_length", "answer length, greedy"),
                       ("heldout_kl", "KL to reference")):
        if any(key in ev[c] for c in cols):
            lines.append(f"{label:<26}" + "".join(f"{_with_se(ev[c], key):>16}" for c in cols))
    lines.append(f"steps: {summary['steps']}")
    if summary.get("stopped_by_guard"):
        lines.append(f"stopped by a guard: {summary['stopped_by_guard']}")
    if summary.get("curves"):
        lines.append(f"curves: {summary['curves']}")
    if summary.get("hf_student"):
        lines.append(f"student (HF): {summary['hf_student']}")
    return "\n".join(lines)


def _with_se(ev: dict, key: str) -> str:
    """``0.1590`` or, for a score with a standard error, ``0.159 ±0.031``."""
    v, se = ev.get(key, math.nan), ev.get(f"{key}_se")
    return f"{v:.4f}" if se is None else f"{v:.3f} ±{se:.3f}"


def _peak_memory_gib() -> float:
    """Peak memory of this process so far: the CUDA allocator's peak on GPU, the peak resident set on CPU
    (the largest over ranks is what a layout must fit)."""
    if on_cuda():
        peak = torch.cuda.max_memory_allocated() / 1024**3
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    return round(max_over_world(peak), 3)
