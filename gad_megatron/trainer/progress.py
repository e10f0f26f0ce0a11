"""What a person following a run sees, on rank 0: on a terminal a tqdm bar; otherwise (a Slurm job's log, CI, a
file) one line every ``log.interval`` steps with the stage's main metrics, seconds a step and the time left, as
Megatron-LM and torchtitan print. Evaluations and checkpoint saves say when they start and how long they took
(timestamps come from the log format), on a terminal too; their time is booked in ``timings.jsonl`` as its own
row, not in a step's."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

log = logging.getLogger("gad_megatron.train")

# The metrics a step line shows, by stage (those present).
MAIN_METRICS = {"warmup": ("sft_loss", "d_loss", "d_acc"),
                "gad": ("reward_mean", "kl", "g_loss", "d_loss", "d_acc", "response_length_mean")}


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, cfg, rank: int, total: int, start: int, runlog=None):
        self.enabled = rank == 0
        self.interval = cfg.log.interval
        self.total, self.runlog = total, runlog
        self.bar = None
        self.window: list = []  # seconds of the steps since the last line
        if self.enabled and cfg.log.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"gad-train ({cfg.train.stage})", dynamic_ncols=True)

    def step(self, step: int, stage: str, m: dict, seconds: float) -> None:
        if not self.enabled:
            return
        shown = [k for k in MAIN_METRICS.get(stage, ()) if isinstance(m.get(k), (int, float))]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{m[k]:.3f}" for k in shown})
            return
        self.window.append(seconds)
        if not self.interval or (step % self.interval and step != self.total):
            return
        per_step = sum(self.window) / len(self.window)
        self.window = []
        metrics = " ".join(f"{k} {m[k]:.4g}" for k in shown)
        log.info("step %d/%d (%s) %s | %.2f s/step | ETA %s", step, self.total, stage, metrics, per_step,
                 _duration(per_step * (self.total - step)))

    @contextmanager
    def phase(self, step: int, kind: str, name: str):
        """Around an evaluation (``kind`` "eval") or a checkpoint save ("checkpoint"): a line at its start and
        one with its duration, and its row in timings.jsonl."""
        t0 = time.perf_counter()
        self._say("%s %s at step %d: started", kind, name, step)
        yield
        seconds = time.perf_counter() - t0
        self._say("%s %s at step %d: done in %.1f s", kind, name, step, seconds)
        if self.runlog is not None:
            self.runlog.timing(step, {kind: name, "seconds": round(seconds, 4)})

    def _say(self, fmt: str, *args) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(fmt % args)
        else:
            log.info(fmt, *args)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
