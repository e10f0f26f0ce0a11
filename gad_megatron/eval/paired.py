"""Two held-out evaluations of one run compared prompt by prompt (the per-prompt scores gad-train writes to
``<run_dir>/heldout/<eval>_step<step>.jsonl``). Between-prompt spread cancels in the difference, so its standard
error is far smaller than either score's: a change that each score's error bars would hide can be seen."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Optional


@dataclass
class Change:
    before: float
    after: float
    change: float  # mean over prompts of (after - before)
    se: float  # its standard error (sd of the per-prompt differences / sqrt(prompts))
    prompts: int


def eval_scores(run_dir: str, name: str, key: str = "sampled") -> dict:
    """``{prompt id: score}`` of the evaluation ``name`` (``before``, ``after_warmup``, ``after``; the last one
    written if the run evaluated that name more than once)."""
    files = sorted(glob.glob(os.path.join(run_dir, "heldout", f"{name}_step*.jsonl")))
    if not files:
        raise FileNotFoundError(f"{run_dir}/heldout: no per-prompt scores of the {name!r} evaluation")
    with open(files[-1], encoding="utf-8") as f:
        return {r["id"]: r[key] for r in map(json.loads, f) if r.get(key) is not None}


def heldout_change(run_dir: str, before: str, after: str, key: str = "sampled") -> Optional[Change]:
    """The change of the held-out ``key`` score ("sampled" or "greedy") from one evaluation to another, over
    the prompts both scored; None with fewer than 2 of them."""
    a, b = eval_scores(run_dir, before, key), eval_scores(run_dir, after, key)
    ids = [i for i in a if i in b]
    if len(ids) < 2:
        return None
    d = [b[i] - a[i] for i in ids]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    return Change(sum(a[i] for i in ids) / len(ids), sum(b[i] for i in ids) / len(ids), mean, se, len(ids))
