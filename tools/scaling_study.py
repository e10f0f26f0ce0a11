"""Scaling study: the same GAD run at several world sizes / layouts; tokens/s, the step-time split and peak
memory from each run's ``timings.jsonl``, next to gad-plan's prediction; a table and a plot.

Locally (gloo ranks on this machine, the tiny demo student unless --config says otherwise):

    python tools/scaling_study.py local --worlds 1 2 4 --out runs/scaling

On a cluster: one ``sbatch --array`` job, one array task per node count, then the same report:

    python tools/scaling_study.py slurm --config examples/configs/gad_qwen2.5_7b.yaml --nodes 1 2 4 --out runs/scaling
    sbatch runs/scaling/sweep.sbatch          # HF_MODEL=... DATA=... as for examples/gad_*.sh
    python tools/scaling_study.py report --out runs/scaling --config examples/configs/gad_qwen2.5_7b.yaml

Strong scaling: the global batch is the config's at every size, so efficiency(N) = tps(N) / (N/N0 x tps(N0)).
The first ``--skip`` steps of each run (start-up, the end-of-warmup evaluation) are left out of the averages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = ("rollout", "old_logprobs", "ref_logprobs", "d_scores", "d_update", "g_update", "sync", "other")


def read_timings(run_dir: str, skip: int = 1) -> dict:
    path = os.path.join(run_dir, "timings.jsonl")
    from gad_megatron.data.jsonl import read_jsonl

    rows = read_jsonl(path)
    gad = [r for r in rows if "g_update" in r or "rollout" in r][skip:] or rows[skip:] or rows
    if not gad:
        raise ValueError(f"{path}: no timed steps")
    mean = lambda k: sum(r.get(k, 0.0) for r in gad) / len(gad)  # noqa: E731
    return {"steps": len(gad), "tokens_per_second": mean("tokens_per_second"), "step_seconds": mean("step_seconds"),
            "split": {k: round(mean(k), 4) for k in SPLIT}, "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in gad)}


def predicted(config: str, world: int, overrides: list, gpu: str, gpus_per_node: int) -> dict:
    """gad-plan's prediction for this world (tokens/s of a GAD step, peak memory); None when it cannot plan."""
    sys.path.insert(0, ROOT)
    from gad_megatron import plan as P
    from gad_megatron.trainer.config import load_config

    try:
        model, lay, wl = P.from_config(load_config(config, overrides))
        arch = P.load_arch(model)
        p = P.plan(arch, lay, world, wl, P.GPUS[gpu])
    except Exception as e:  # noqa: BLE001  (a prediction is a column in a table, not a reason to fail)
        return {"error": str(e)}
    if p.memory is None:
        return {"error": "; ".join(p.problems)}
    return {"tokens_per_second": p.time["tokens_per_step"] / p.time["gad_step_s"], "peak_mem_gib": p.memory.peak / P.GIB}


def write_report(rows: list, out: str) -> dict:
    rows = sorted(rows, key=lambda r: r["world"])
    base = rows[0]
    for r in rows:
        ideal = base["tokens_per_second"] * r["world"] / base["world"]
        r["efficiency"] = r["tokens_per_second"] / ideal if ideal else None
        pr = r.get("predicted") or {}
        if pr.get("tokens_per_second"):
            pb = (base.get("predicted") or {}).get("tokens_per_second")
            r["predicted_efficiency"] = pr["tokens_per_second"] / (pb * r["world"] / base["world"]) if pb else None
    lines = ["| world | layout | tokens/s | efficiency | step s | " + " | ".join(SPLIT) +
             " | peak mem GiB | predicted tokens/s | predicted efficiency |",
             "|---" * (9 + len(SPLIT)) + "|"]
    for r in rows:
        pr = r.get("predicted") or {}
        lines.append(
            f"| {r['world']} | {r['layout']} | {r['tokens_per_second']:.1f} | {r['efficiency']:.2f} | "
            f"{r['step_seconds']:.2f} | " + " | ".join(f"{r['split'][k]:.2f}" for k in SPLIT) +
            f" | {r['peak_mem_gib']:.2f} | " +
            (f"{pr['tokens_per_second']:.1f}" if pr.get("tokens_per_second") else "-") + " | " +
            (f"{r['predicted_efficiency']:.2f}" if r.get("predicted_efficiency") else "-") + " |")
    os.makedirs(out, exist_ok=True)
    paths = {"markdown": os.path.join(out, "scaling.md"), "json": os.path.join(out, "scaling.json"),
             "png": os.path.join(out, "scaling.png")}
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths["json"], "w") as f:
        json.dump(rows, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ws = [r["world"] for r in rows]
    a1.plot(ws, [r["tokens_per_second"] for r in rows], "o-", label="measured")
    a1.plot(ws, [base["tokens_per_second"] * w / base["world"] for w in ws], "--", color="grey", label="linear")
    if all((r.get("predicted") or {}).get("tokens_per_second") for r in rows):
        a1.plot(ws, [r["predicted"]["tokens_per_second"] for r in rows], "s:", label="gad-plan")
    a1.set_xlabel("GPUs / ranks"), a1.set_ylabel("tokens / s"), a1.legend(fontsize=8)
    a2.plot(ws, [r["efficiency"] for r in rows], "o-", label="measured")
    if all(r.get("predicted_efficiency") for r in rows):
        a2.plot(ws, [r["predicted_efficiency"] for r in rows], "s:", label="gad-plan")
    a2.axhline(1.0, color="grey", lw=0.8, ls="--")
    a2.set_xlabel("GPUs / ranks"), a2.set_ylabel("scaling efficiency"), a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    print("\n".join(lines))
    return paths


# ---- local: gloo ranks on this machine ---------------------------------------------------------------------------
def demo_config(out: str, steps: int) -> tuple:
    """The demo's tiny student and shipped data, megatron-engine rollouts (no vLLM process per size)."""
    sys.path.insert(0, ROOT)
    from gad_megatron.data import demo

    student = demo.make_student(os.path.join(out, "student"), seed=3)
    cfg = os.path.join(ROOT, "gad_megatron", "assets", "demo", "demo.yaml")
    overrides = [f"model.student={student}", f"data.train={demo.ASSET}", "rollout.engine=megatron", "rollout.n=4",
                 "train.batch_prompts=16", f"train.total_steps={steps}", "train.warmup_steps=1",
                 "train.critic_warmup=0", "checkpoint.save_every=1000", "eval.heldout_every=0", "log.progress=false",
                 "data.heldout_size=8"]
    return cfg, overrides


def run_local(a) -> int:
    config, overrides = (a.config, []) if a.config else demo_config(a.out, a.steps)
    overrides += a.overrides
    rows = []
    for world in a.worlds:
        run_dir = os.path.join(a.out, f"world{world}")
        cmd = [sys.executable, "-m", "gad_megatron.trainer.cli", "--config", config, *overrides,
               f"parallel.nproc={world}", f"log.run_dir={run_dir}", "checkpoint.resume=none"]
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "GAD_DEMO_DATA": os.environ.get("GAD_DEMO_DATA", "")}
        log = os.path.join(a.out, f"world{world}.log")
        os.makedirs(a.out, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=a.timeout).returncode
        if rc != 0:
            print(f"scaling study: world {world} failed (exit {rc}); see {log}", file=sys.stderr)
            return 1
        r = {"world": world, "layout": f"TP1 PP1 DP{world}", **read_timings(run_dir, a.skip)}
        r["predicted"] = predicted(config, world, overrides + [f"parallel.nproc={world}"], a.gpu, a.gpus_per_node)
        rows.append(r)
    write_report(rows, a.out)
    return 0


# ---- cluster: one sbatch --array job -----------------------------------------------------------------------------
def write_sweep(a) -> int:
    nodes = sorted(a.nodes)
    cases = "\n".join(f"  {i}) N={n} ;;" for i, n in enumerate(nodes))
    extra = " ".join(a.overrides)
    script = f"""#!/usr/bin/env bash
# Scaling sweep: array task i runs {a.config} on N nodes (see the case below), {a.steps} steps each.
#SBATCH --job-name=gad-scaling
#SBATCH --array=0-{len(nodes) - 1}
#SBATCH --nodes={nodes[-1]}
#SBATCH --ntasks-per-node={a.gpus_per_node}
#SBATCH --gpus-per-node={a.gpus_per_node}
#SBATCH --exclusive
#SBATCH --time=02:00:00
#SBATCH --output={os.path.abspath(a.out)}/slurm-%A_%a.out
set -euo pipefail
case "$SLURM_ARRAY_TASK_ID" in
{cases}
esac
cd "${{GAD_ROOT:-{ROOT}}}"
eval "$(python -m gad_megatron.runtime.slurm env)"
srun --nodes="$N" --ntasks-per-node={a.gpus_per_node} --kill-on-bad-exit=1 gad-train --config {a.config} \\
  log.run_dir={os.path.abspath(a.out)}/world$((N * {a.gpus_per_node})) checkpoint.resume=none \\
  train.total_steps={a.steps} checkpoint.save_every=1000 eval.heldout_every=0 parallel.nproc=$((N * {a.gpus_per_node})) \\
  ${{HF_MODEL:+model.student=$HF_MODEL}} ${{DATA:+data.train=$DATA}} {extra}
"""
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "sweep.sbatch")
    with open(path, "w") as f:
        f.write(script)
    print(f"wrote {path}: sbatch it, then: python tools/scaling_study.py report --out {a.out} --config {a.config}")
    return 0


def report(a) -> int:
    rows = []
    for name in sorted(os.listdir(a.out)):
        if name.startswith("world") and os.path.isdir(os.path.join(a.out, name)):
            world = int(name[len("world"):])
            r = {"world": world, "layout": "", **read_timings(os.path.join(a.out, name), a.skip)}
            if a.config:
                r["predicted"] = predicted(a.config, world, a.overrides + [f"parallel.nproc={world}"], a.gpu,
                                           a.gpus_per_node)
            rows.append(r)
    if not rows:
        print(f"scaling study: no world*/timings.jsonl under {a.out}", file=sys.stderr)
        return 1
    write_report(rows, a.out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("local", "slurm", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--config", default=None)
        p.add_argument("--skip", type=int, default=2, help="first timed steps left out (start-up, end-of-warmup eval)")
        p.add_argument("--gpu", default="cpu" if name == "local" else "h100-80gb")
        p.add_argument("--gpus-per-node", type=int, default=8)
        p.add_argument("--steps", type=int, default=5)
        p.add_argument("--timeout", type=int, default=1200)
        p.add_argument("overrides", nargs="*")
        if name == "local":
            p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
        if name == "slurm":
            p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    a = ap.parse_args(argv)
    if a.cmd == "local":
        return run_local(a)
    if a.cmd == "slurm":
        if not a.config:
            ap.error("slurm needs --config")
        return write_sweep(a)
    return report(a)


if __name__ == "__main__":
    sys.exit(main())
