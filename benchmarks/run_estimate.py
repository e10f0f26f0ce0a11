#!/usr/bin/env python
"""A finished run against the whole-run estimate it printed at its start (#31 item 3).

    python benchmarks/run_estimate.py RUN_DIR LOG

``LOG`` is the run's output (the ``the whole run: ...`` line ``gad-train`` prints before its first step);
``RUN_DIR/timings.jsonl`` gives what each part took. Prints, by part (steps by kind, evaluations, checkpoint
saves), the estimate, the measurement and their ratio, and the ratio of the totals: the parts the estimate
counts (start-up is not one of them).
"""

import json
import os
import re
import sys

_PART = re.compile(r"(\d+) (SeqKD|warmup with D|GAD|evaluations|checkpoint saves)(?: steps)? x ~([\d.]+) (s|min|h)")
_UNIT = {"s": 1.0, "min": 60.0, "h": 3600.0}


_TOTAL = re.compile(r": ~([\d.]+) (s|min|h) \(start-up not counted\)")


def estimate(log: str) -> tuple:
    """({part: (count, seconds each)}, the whole estimate in seconds): the parts as printed (rounded), the total
    as printed (from the unrounded parts)."""
    line = next((x for x in open(log) if "the whole run:" in x), None)
    if line is None:
        raise SystemExit(f"{log}: no 'the whole run:' line (the estimate gad-train prints at its start)")
    total = _TOTAL.search(line)
    return ({kind: (int(n), float(v) * _UNIT[u]) for n, kind, v, u in _PART.findall(line)},
            float(total.group(1)) * _UNIT[total.group(2)])


def measured(run_dir: str) -> dict:
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "timings.jsonl"))]
    stages = {}
    for x in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(x)
        if "eval" not in r and "step" in r:
            stages[r["step"]] = (r.get("stage"), "d_update" in r or "d_loss" in r)
    out = {}
    for r in rows:
        if "eval" in r:
            kind = "evaluations"
        elif "checkpoint" in r:
            kind = "checkpoint saves"
        else:
            stage, with_d = stages.get(r["step"], (None, False))
            kind = {"gad": "GAD", "seqkd": "SeqKD"}.get(stage, "warmup with D" if "d_update" in r else "SeqKD")
        n, s = out.get(kind, (0, 0.0))
        out[kind] = (n + 1, s + r.get("seconds", r.get("step_seconds", 0.0)))
    return out


def main():
    run_dir, log = sys.argv[1], sys.argv[2]
    (est, est_total), got = estimate(log), measured(run_dir)
    print(f"{'part':<18} {'estimated':>16} {'measured':>16} {'measured / estimated':>22}")
    tot_e = tot_m = 0.0
    for kind in ("SeqKD", "warmup with D", "GAD", "evaluations", "checkpoint saves"):
        ne, se = est.get(kind, (0, 0.0))
        nm, sm = got.get(kind, (0, 0.0))
        if not ne and not nm:
            continue
        tot_e, tot_m = tot_e + ne * se, tot_m + sm
        ratio = f"{sm / (ne * se):.2f}" if ne * se else "-"
        print(f"{kind:<18} {ne:>5} x {se:7.2f} s {nm:>5}: {sm:8.1f} s {ratio:>22}")
    print(f"{'total':<18} {est_total:14.1f} s {tot_m:14.1f} s {tot_m / est_total:22.2f}   (the parts above are rounded "
          f"as printed; the total is the estimate's own)")


if __name__ == "__main__":
    main()
