#!/usr/bin/env python
"""`gad-train` on the device end to end (part 3 of ``gpu_check.sh``): the demo task with megatron-engine rollouts
for a few steps with checkpoints, then a second start that resumes and runs on. Prints one table row per start
and the GAD step time / rollout share from ``timings.jsonl``; writes ``gpu_check_run.json`` under ``--out``.

    python benchmarks/gpu_check_run.py --out /tmp/gpu_check [--device cpu]
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(run_dir: str, device: str, total: int) -> int:
    cmd = [sys.executable, "-m", "gad_megatron.trainer.cli", "--demo", "parallel.nproc=1", f"parallel.device={device}",
           "rollout.engine=megatron", "train.warmup_steps=4", f"train.total_steps={total}", "checkpoint.save_every=4",
           "log.progress=false", "eval.heldout_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    p = subprocess.run(cmd, cwd=ROOT, env={**env, "GAD_DEMO_DIR": run_dir}, capture_output=True, text=True,
                       timeout=600)
    if p.returncode:
        print(p.stdout[-2000:] + p.stderr[-4000:], file=sys.stderr)
    return p.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    run = os.path.join(a.out, "gad_train_run")
    res = {"first_rc": start(run, a.device, 8)}
    res["resume_rc"] = start(run, a.device, 12) if res["first_rc"] == 0 else None
    ok = res["first_rc"] == 0 and res["resume_rc"] == 0
    if ok:
        rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
        steps = [r["step"] for r in rows if "eval" not in r]
        timings = [json.loads(x) for x in open(os.path.join(run, "timings.jsonl"))]
        gad = [t for t in timings if "g_update" in t and "rollout" in t][1:]  # the first GAD step warms up
        summary = json.load(open(os.path.join(run, "summary.json")))
        res.update(steps=steps, summary_steps=summary["steps"], engine=summary["rollout_engine"],
                   gad_step_s=sum(t["step_seconds"] for t in gad) / max(1, len(gad)),
                   rollout_share=sum(t["rollout"] for t in gad) / max(1e-9, sum(t["step_seconds"] for t in gad)))
        ok = steps == list(range(1, 13)) and summary["steps"] == 12 and summary["rollout_engine"] == "megatron"
    res["ok"] = ok
    with open(os.path.join(a.out, "gpu_check_run.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"gad-train on {a.device}: 8 steps with checkpoints, resumed to 12: {'ok' if ok else 'FAILED'}"
          + (f"; GAD step {res['gad_step_s']:.3f} s, rollout share {res['rollout_share']:.2f} (demo model)" if ok else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
