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


def mean_se(xs: list) -> tuple:
    """``(mean, standard error of the mean)`` of ``xs`` (the sample sd / sqrt(n); 0 for a single value)."""
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return mean, (var / len(xs)) ** 0.5


def eval_scores(run_dir: str, name: str, key: str = "sampled") -> dict:
    """``{prompt id: score}`` of the evaluation ``name`` (``before``, ``after_warmup``, ``after``; the last one
    written if the run evaluated that name more than once)."""
    files = sorted(glob.glob(os.path.join(run_dir, "heldout", f"{name}_step*.jsonl")))
    if not files:
        raise FileNotFoundError(f"{run_dir}/heldout: no per-prompt scores of the {name!r} evaluation")
    with open(files[-1], encoding="utf-8") as f:
        return {r["id"]: r[key] for r in map(json.loads, f) if r.get(key) is not None}


def heldout_change(run_dir: str, before: str, after: str, key: str = "sampled") -> Optional[Change]:
    """The change of the held-out ``key`` score ("sampled" or "greedy") from one evaluation of a run to another,
    over the prompts both scored; None with fewer than 2 of them."""
    return change_between(run_dir, before, run_dir, after, key)


def change_between(run_a: str, eval_a: str, run_b: str, eval_b: str, key: str = "sampled") -> Optional[Change]:
    """As :func:`heldout_change`, from run A's evaluation to run B's (a warm start's end and a run branched
    from it: the same prompts and, with the same ``eval.seed``, the same random draws)."""
    a, b = eval_scores(run_a, eval_a, key), eval_scores(run_b, eval_b, key)
    ids = [i for i in a if i in b]
    if len(ids) < 2:
        return None
    mean, se = mean_se([b[i] - a[i] for i in ids])
    return Change(sum(a[i] for i in ids) / len(ids), sum(b[i] for i in ids) / len(ids), mean, se, len(ids))


def main(argv=None) -> int:
    """``python -m gad_megatron.eval.paired RUN_A EVAL_A RUN_B EVAL_B``: the change of the held-out sampled
    (and greedy) score from run A's evaluation to run B's over their common prompts, e.g. a warm start's end and
    a run branched from it; the verdict "learns" when the sampled change is above 2 standard errors."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("run_a")
    ap.add_argument("eval_a")
    ap.add_argument("run_b")
    ap.add_argument("eval_b")
    a = ap.parse_args(argv)
    said = []
    for key in ("sampled", "greedy"):
        c = change_between(a.run_a, a.eval_a, a.run_b, a.eval_b, key)
        if c is not None:
            said.append((key, c))
    if not said:
        print("no common prompts")
        return 1
    text = "; ".join(f"{k} {c.before:.4f} -> {c.after:.4f}, change {c.change:+.4f} +- {c.se:.4f} over {c.prompts} "
                     f"prompts" for k, c in said)
    sampled = dict(said).get("sampled")
    verdict = "learns" if sampled is not None and sampled.change > 2 * sampled.se else "does not learn"
    print(f"{text}: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
