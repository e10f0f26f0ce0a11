"""Every number of a step: reduction across ranks, the run's logs, warnings for GAD's known failure modes.

- ``metrics.jsonl`` (always): one line per step of what the step computed (losses, accuracies, scores,
  lengths, gaps, counters). Nothing in it depends on the clock, so one seed gives one file, bit for bit.
- ``timings.jsonl`` (always): the same steps' time split (rollout / sync / ref / G / D / other), tokens/s.
- TensorBoard (always, both of the above), W&B when ``log.wandb_project`` is set.
- ``samples/step_XXXXXXX.jsonl`` every M steps: prompt id, response, reward, advantage, length.
- ``curves.png`` at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

import torch

from gad_megatron.data.jsonl import iter_jsonl, read_jsonl
from gad_megatron.runtime.parallel import comm_device

log = logging.getLogger("gad_megatron.train")


def reduce_pairs(pairs: dict) -> dict:
    """Collective over the whole world: ``{name: [sum, count]}`` -> ``{name: sum / count}``.

    Only last-pipeline-stage ranks hold values (others pass zeros); TP ranks of a stage hold the same
    pair, which scales sum and count alike, so the ratio is the global mean over all DP ranks.
    """
    import torch.distributed as dist

    names = sorted(pairs)
    t = torch.zeros(len(names), 2, dtype=torch.float64)
    for i, n in enumerate(names):
        t[i] = pairs[n].double().cpu()
    if dist.is_initialized():
        t = t.to(comm_device())
        dist.all_reduce(t)
        t = t.cpu()
    return {n: (t[i, 0] / t[i, 1]).item() if t[i, 1] > 0 else float("nan") for i, n in enumerate(names)}


def sum_outputs(outputs: Optional[list], names: Optional[list] = None) -> dict:
    """Adds the ``[sum, count]`` logs of every micro-batch (last stage; empty dict elsewhere)."""
    acc = {}
    for out in outputs or []:
        for k, v in out.items():
            if names is not None and k not in names:
                continue
            acc[k] = acc.get(k, 0) + v.double().cpu()
    return acc


def zero_pairs(names) -> dict:
    return {n: torch.zeros(2, dtype=torch.float64) for n in names}


def max_over_world(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class FailureWatch:
    """Warnings for the failure modes users of GAD report: D saturated, response length drifting (reward
    hacking), a growing trainer-vs-rollout logprob gap. State is JSON-able (saved in checkpoints)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.saturated_steps = 0
        self.base_length: Optional[float] = None

    def check(self, m: dict) -> list:
        c = self.cfg.log
        warnings = []
        if "d_acc" in m:
            self.saturated_steps = self.saturated_steps + 1 if m["d_acc"] > c.d_saturation_acc else 0
            if self.saturated_steps == c.d_saturation_steps:
                warnings.append(f"discriminator saturated: d_acc > {c.d_saturation_acc} for {c.d_saturation_steps} "
                                f"steps (G gets little signal; consider a lower d_optim.lr)")
        if m.get("stage") == "gad" and "response_length_mean" in m:
            if self.base_length is None:
                self.base_length = m["response_length_mean"]
            elif self.base_length > 0 and m["response_length_mean"] > c.length_drift_ratio * self.base_length:
                warnings.append(f"response length drifting: mean {m['response_length_mean']:.1f} > "
                                f"{c.length_drift_ratio} x the first GAD step's {self.base_length:.1f} (reward hacking?)")
        gap = m.get("logprob_gap_mean")
        if gap is not None and not math.isnan(gap) and gap > c.gap_warn:
            warnings.append(f"trainer-vs-rollout logprob gap {gap:.3e} > log.gap_warn={c.gap_warn:.1e}")
        return warnings

    def state_dict(self) -> dict:
        return {"saturated_steps": self.saturated_steps, "base_length": self.base_length}

    def load_state_dict(self, sd: dict) -> None:
        self.saturated_steps, self.base_length = sd["saturated_steps"], sd["base_length"]


class RunLog:
    """Rank 0's sinks. Every method is a no-op on other ranks."""

    def __init__(self, cfg, run_dir: str, rank: int, resumed_step: int = 0):
        self.enabled = rank == 0
        self.run_dir = run_dir
        self.tb = self.wandb = None
        if not self.enabled:
            return
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        # On resume, lines of steps after the checkpoint (written before the kill) are dropped so the file
        # reads as one uninterrupted run.
        for name in ("metrics.jsonl", "timings.jsonl"):
            _truncate_after(os.path.join(run_dir, name), resumed_step)
        self.metrics_f = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.timings_f = open(os.path.join(run_dir, "timings.jsonl"), "a")
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resumed_step + 1)
        if cfg.log.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.log.wandb_project, dir=run_dir, resume="allow",
                                    config=json.loads(json.dumps(_plain(cfg))))

    def step(self, step: int, metrics: dict, timings: dict) -> None:
        if not self.enabled:
            return
        self.metrics_f.write(json.dumps(finite({"step": step, **metrics}), sort_keys=True, allow_nan=False) + "\n")
        self.metrics_f.flush()
        if timings:
            self.timings_f.write(json.dumps(finite({"step": step, **timings}), sort_keys=True, allow_nan=False) + "\n")
            self.timings_f.flush()
        scalars = {k: v for k, v in {**metrics, **{f"time/{k}": v for k, v in timings.items()}}.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def timing(self, step: int, row: dict) -> None:
        """A timings.jsonl row of its own (an evaluation, a checkpoint save), not a step's."""
        if self.enabled:
            self.timings_f.write(json.dumps({"step": step, **row}, sort_keys=True) + "\n")
            self.timings_f.flush()

    def heldout(self, step: int, name: str, rows: list) -> None:
        """Per-prompt held-out scores of one evaluation: ``heldout/<name>_step<step>.jsonl``."""
        if not self.enabled:
            return
        os.makedirs(os.path.join(self.run_dir, "heldout"), exist_ok=True)
        with open(os.path.join(self.run_dir, "heldout", f"{name}_step{step:07d}.jsonl"), "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)

    def samples(self, step: int, rows: list) -> None:
        if not self.enabled:
            return
        path = os.path.join(self.run_dir, "samples", f"step_{step:07d}.jsonl")
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_f.close()
        self.timings_f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def finite(obj):
    """``obj`` with every NaN / inf float as None: metrics.jsonl is strict JSON. A value is NaN when the step had
    nothing to measure it on (``d_acc`` of a step whose samples were all truncated: no pair entered D's loss),
    and null says exactly that; an infinite value is logged as null too (the guards see it before the log)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _plain(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _truncate_after(path: str, step: int) -> None:
    """Keeps the rows of steps <= ``step`` (those written after the checkpoint go, and a torn last line from a
    kill). Rows are re-written as they were written (``json.dumps(..., sort_keys=True)``): the same bytes."""
    if not os.path.isfile(path):
        return

    keep = []
    for _, row in iter_jsonl(path):
        if isinstance(row, Exception) or "step" not in row:
            break  # a torn last line from a kill
        # An evaluation at the checkpoint's step (the end of warmup, the end) is logged after that checkpoint
        # was written: the resumed run logs it again. Only 'before' (step 0) precedes every checkpoint.
        after_ckpt = "eval" in row and row["eval"] != "before" and row["step"] >= step
        if row["step"] <= step and not after_ckpt:
            keep.append(json.dumps(finite(row), sort_keys=True, allow_nan=False) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def plot_curves(run_dir: str, out: Optional[str] = None) -> Optional[str]:
    """The main curves of ``metrics.jsonl`` as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        return None
    panels = [("sft_loss", "G cross-entropy (warmup / SeqKD)"), ("g_loss", "G GRPO loss"), ("d_loss", "D Bradley-Terry loss"),
              ("d_acc", "D pairwise accuracy"), ("reward_mean", "reward = D(student)"),
              ("teacher_score", "D(teacher) vs D(student)"), ("kl", "KL to reference"),
              ("response_length_mean", "response length"), ("heldout_score", "held-out score (greedy)"),
              ("heldout_score_sampled", "held-out score (sampled)"), ("heldout_kl", "held-out KL to reference"),
              ("heldout_d_acc", "held-out D accuracy"), ("opd_kl_k3", "reverse KL to the OPD teacher")]
    panels = [p for p in panels if any(p[0] in r for r in rows)]
    fig, axes = plt.subplots(math.ceil(len(panels) / 3), 3, figsize=(13, 3.2 * math.ceil(len(panels) / 3)), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        xs = [r["step"] for r in rows if key in r]
        ax.plot(xs, [math.nan if r[key] is None else r[key] for r in rows if key in r], label=key)  # null: not measured
        if key == "teacher_score":
            ax.plot([r["step"] for r in rows if "student_score" in r], [r["student_score"] for r in rows if "student_score" in r],
                    label="student_score")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
