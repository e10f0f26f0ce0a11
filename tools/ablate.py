"""Ablation: named variants of one config from the same warm start, data and seeds; held-out scores per variant
(mean +- std over seeds) in ablation.md / ablation.json / ablation.png.

Per seed, one warmup run (SeqKD for G, BT for D: ``--warmup-steps``) is the shared start; every variant then
continues from its checkpoint for ``--steps`` more steps (``checkpoint.resume=<warm start>``), so the variants
differ in nothing but their settings. Locally (the demo task unless --config says otherwise):

    python tools/ablate.py local --out runs/ablation --seeds 1 2 3 --warmup-steps 120 --steps 40
    python tools/ablate.py local --variants seqkd gad --seeds 1 2 --warmup-steps 4 --steps 2 --out /tmp/abl
    python tools/ablate.py local --variants opd gad+opd --opd-teacher runs/demo_teacher/hf_student --out runs/ablation

On a cluster: one ``sbatch --array`` job per stage (warm starts, then the variants), then the same report:

    python tools/ablate.py slurm --config examples/configs/gad_qwen2.5_7b.yaml --seeds 1 2 3 --out runs/ablation
    python tools/ablate.py report --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what it is, its overrides on top of the config). `seqkd` continues the warmup's SFT instead of GAD.
VARIANTS = {
    "seqkd": ("SeqKD continued for the same steps", ["train.stage=seqkd"]),
    "gad": ("GAD as the paper: sampled tokens to D, truncated samples scored by D",
            ["reward.canonical_text=false", "algo.truncated_reward=score"]),
    "gad+fixes": ("GAD + re-encoded text to D, truncated = group min, batch-std advantages, D/G band",
                  ["algo.adv_std=batch", "reward.d_acc_band=[0.55,0.9]"]),
    "gad+replay": ("gad+fixes + a replay buffer of the last 4 steps' samples for D",
                   ["algo.adv_std=batch", "reward.d_acc_band=[0.55,0.9]", "reward.replay_steps=4"]),
    "oracle": ("GRPO on the task's own scorer (eval.scorer) instead of D", ["reward.source=scorer"]),
    "opd": ("white-box on-policy distillation: per-token reverse KL to --opd-teacher, no D", ["reward.source=opd"]),
    "gad+opd": ("GAD (D's GRPO advantages) + OPD per token, weights 1 and 1", ["reward.source=gad+opd"]),
}
NEEDS_TEACHER = ("opd", "gad+opd")  # variants that need a white-box teacher (--opd-teacher)
LAST_STEP = ("d_acc", "opd_kl_k3")  # from the last training step that logged them
METRICS = ("heldout_score", "heldout_score_sampled", "heldout_ce", "heldout_length", "heldout_kl", "heldout_d_acc")
SCORES = ("heldout_score", "heldout_score_sampled")  # those with an evaluation standard error (<key>_se)


def demo_setup(out: str) -> tuple:
    """The demo task: shipped data and config, a tiny student made once, megatron-engine rollouts."""
    sys.path.insert(0, ROOT)
    from gad_megatron.data import demo

    student = demo.make_student(os.path.join(out, "student"), seed=3)
    cfg = os.path.join(ROOT, "gad_megatron", "assets", "demo", "demo.yaml")
    return cfg, [f"model.student={student}", f"data.train={demo.ASSET}", "log.progress=false", "log.plot=false",
                 "checkpoint.export_hf_at_end=false", "log.tensorboard=false"]


def scorer_override(config: str, overrides: list) -> list:
    """The oracle's reward is the evaluation's scorer."""
    sys.path.insert(0, ROOT)
    from gad_megatron.trainer.config import load_config

    spec = load_config(config, overrides).eval.scorer
    return [f"reward.scorer={spec}"] if spec else []


def commands(a, config: str, base: list) -> tuple:
    """(warm-start commands per seed, variant commands per (variant, seed)) as argument lists."""
    train = [sys.executable, "-m", "gad_megatron.trainer.cli", "--config", config]
    warm, runs = {}, {}
    for seed in a.seeds:
        w = os.path.join(a.out, f"warm_seed{seed}")
        warm[seed] = train + base + a.overrides + [
            f"train.seed={seed}", f"train.warmup_steps={a.warmup_steps}", f"train.total_steps={a.warmup_steps + a.steps}",
            f"train.stop_after={a.warmup_steps}", f"checkpoint.save_every={a.warmup_steps}", "checkpoint.resume=none",
            f"log.run_dir={w}", "eval.at_start=false"]  # its end-of-run evaluation is the warm start's
        for v in a.variants:
            extra = VARIANTS[v][1] + (scorer_override(config, base + a.overrides) if v == "oracle" else []) \
                + ([f"opd.teacher={os.path.abspath(a.opd_teacher)}"] if v in NEEDS_TEACHER else [])
            runs[(v, seed)] = train + base + a.overrides + extra + [
                f"train.seed={seed}", f"train.warmup_steps={a.warmup_steps}",
                f"train.total_steps={a.warmup_steps + a.steps}",
                f"checkpoint.save_every={getattr(a, 'save_every', 0) or a.warmup_steps + a.steps}",
                f"checkpoint.resume={w}/checkpoints", f"log.run_dir={os.path.join(a.out, v, f'seed{seed}')}",
                "eval.after_warmup=false"]  # every variant starts where the warm start's evaluation was taken
    return warm, runs


def _run(cmd: list, log: str, timeout: int) -> int:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "a") as f:  # a resumed run appends
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout).returncode


def _done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "summary.json"))


def _resumable(cmd: list, run_dir: str) -> list:
    """A variant run stopped part-way continues from its own latest checkpoint, not from the warm start."""
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
        return [c for c in cmd if not c.startswith("checkpoint.resume=")] + ["checkpoint.resume=auto"]
    return cmd


def same_settings(a, config: str, base: list) -> str:
    """'' when ``a.out`` is new or was made with these settings (then they are recorded in ablate_settings.json);
    otherwise what differs. Variants and seeds may be added to an --out; the runs' settings may not change."""
    now = {"config": os.path.abspath(config), "warmup_steps": a.warmup_steps, "steps": a.steps,
           "overrides": list(base) + list(a.overrides), "opd_teacher": a.opd_teacher}
    path = os.path.join(a.out, "ablate_settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        return "; ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in now.items() if old.get(k) != v)
    with open(path, "w") as f:
        json.dump(now, f, indent=1)
    return ""


def run_local(a) -> int:
    """Seed by seed: the warm start, then each variant. Resumable: a finished run (summary.json, or for a warm
    start its checkpoint) is skipped and a run killed part-way continues from its last checkpoint, so a long
    ablation can run in parts (re-run the same command)."""
    os.makedirs(a.out, exist_ok=True)
    config, base = (a.config, []) if a.config else demo_setup(a.out)
    changed = same_settings(a, config, base)
    if changed:
        print(f"ablate: {a.out} holds runs made with other settings ({changed}); their table would be printed as "
              f"this one's: use another --out, or the same settings to resume", file=sys.stderr)
        return 2
    warm, runs = commands(a, config, base)
    for seed, cmd in warm.items():
        w = os.path.join(a.out, f"warm_seed{seed}")
        # Done only with its summary: a warm start stopped during its final evaluation (checkpoint written, no
        # summary.json) resumes from that checkpoint and only evaluates; its numbers are the table's start row.
        if not _done(w):
            print(f"ablate: warm start seed {seed}", flush=True)
            if _run(_resumable(cmd, w), os.path.join(a.out, f"warm_seed{seed}.log"), a.timeout):
                print(f"ablate: warm start of seed {seed} failed; see {a.out}/warm_seed{seed}.log", file=sys.stderr)
                return 1
        for v in a.variants:
            run_dir = os.path.join(a.out, v, f"seed{seed}")
            if _done(run_dir):
                continue
            log = os.path.join(a.out, f"{v}_seed{seed}.log")
            print(f"ablate: {v} seed {seed}", flush=True)
            if _run(_resumable(runs[(v, seed)], run_dir), log, a.timeout):
                print(f"ablate: {v} seed {seed} failed; see {log}", file=sys.stderr)
                return 1
    return report(a)


def write_slurm(a) -> int:
    """Two array jobs: the warm starts, then (afterok) the variants; each task runs one gad-train."""
    os.makedirs(a.out, exist_ok=True)
    warm, runs = commands(a, a.config, [])

    def job(name, cmds, dep):
        cases = "\n".join(f"  {i}) exec {' '.join(shlex.quote(c) for c in ['gad-train'] + cmd[3:])} ;;"
                          for i, cmd in enumerate(cmds))
        return f"""#!/usr/bin/env bash
#SBATCH --job-name=gad-ablate-{name}
#SBATCH --array=0-{len(cmds) - 1}
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --output={os.path.abspath(a.out)}/slurm-{name}-%A_%a.out
{dep}set -euo pipefail
cd "${{GAD_ROOT:-{ROOT}}}"
case "$SLURM_ARRAY_TASK_ID" in
{cases}
esac
"""
    for name, cmds in (("warm", list(warm.values())), ("variants", list(runs.values()))):
        with open(os.path.join(a.out, f"{name}.sbatch"), "w") as f:
            f.write(job(name, cmds, ""))
    q = lambda name: shlex.quote(os.path.join(a.out, name) if name else a.out)  # noqa: E731  (pasted into a shell)
    print(f"wrote {a.out}/warm.sbatch and variants.sbatch:\n  jid=$(sbatch --parsable {q('warm.sbatch')})\n"
          f"  sbatch --dependency=afterok:$jid {q('variants.sbatch')}\n  python tools/ablate.py report --out {q('')}")
    return 0


def run_result(run_dir: str) -> dict:
    """The 'after' evaluation, the warm start's (the warm start run's own 'after' evaluation, else this run's
    ``after_warmup``), and the last training step's d_acc and reverse KL to an OPD teacher."""
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    seed = os.path.basename(run_dir)
    warm_summary = os.path.join(os.path.dirname(os.path.dirname(run_dir)), f"warm_{seed}", "summary.json")
    warm = _read_json(warm_summary)["evals"].get("after", {}) if os.path.isfile(warm_summary) else {}
    sys.path.insert(0, ROOT)
    from gad_megatron.data.jsonl import read_jsonl

    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "eval" not in r]
    d_acc = next((r["d_acc"] for r in reversed(rows) if "d_acc" in r), None)
    opd_kl = next((r["opd_kl_k3"] for r in reversed(rows) if "opd_kl_k3" in r), None)
    after = summary["evals"].get("after", {})
    return {**{k: after.get(k) for k in METRICS}, **{f"{k}_se": after.get(f"{k}_se") for k in SCORES},
            "d_acc": d_acc, "opd_kl_k3": opd_kl,
            "warm": warm or summary["evals"].get("after_warmup", {}),
            "stopped_by_guard": summary.get("stopped_by_guard")}


class BadRun(ValueError):
    """A run's file the report cannot read (named in the message)."""


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRun(f"{path}: not valid JSON ({e}); rerun that run (`ablate.py local` resumes it) or remove it") from None
    if not isinstance(out, dict) or "evals" not in out:
        raise BadRun(f"{path}: not a gad-train summary (no 'evals')")
    return out


EVAL_KEYS = (("data", "train"), ("data", "heldout"), ("data", "heldout_size"), ("eval", "scorer"),
             ("eval", "max_prompts"), ("eval", "samples"), ("eval", "max_tokens"))


def evaluated_alike(run_dirs: list) -> str:
    """'' when every run (its ``config.yaml``) trained on the same data and was scored by the same scorer on the
    same held-out prompts; else one line naming two runs and the first setting where they differ."""
    import yaml

    first = None
    for d in run_dirs:
        path = os.path.join(d, "config.yaml")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        got = {f"{sec}.{key}": (cfg.get(sec) or {}).get(key) for sec, key in EVAL_KEYS}
        if first is None:
            first = (d, got)
            continue
        for k, v in got.items():
            if v != first[1][k]:
                return f"{first[0]} has {k}={first[1][k]!r} and {d} has {k}={v!r}"
    return ""


def _stats(xs: list) -> tuple:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def report(a) -> int:
    results, warm = {}, {}
    for v in VARIANTS:
        vdir = os.path.join(a.out, v)
        if not os.path.isdir(vdir):
            continue
        for name in sorted(os.listdir(vdir)):
            if os.path.isfile(os.path.join(vdir, name, "summary.json")):
                try:
                    r = run_result(os.path.join(vdir, name))
                except BadRun as e:
                    print(f"ablate: {e}", file=sys.stderr)
                    return 1
                results.setdefault(v, {})[name] = r
                if r["warm"]:
                    warm[name] = r["warm"]
    if not results:
        print(f"ablate: no <variant>/seed*/summary.json under {a.out}", file=sys.stderr)
        return 1
    differ = evaluated_alike([os.path.join(a.out, v, name) for v, per in results.items() for name in per]
                             + [os.path.join(a.out, f"warm_{name}") for name in warm])
    if differ:
        print(f"ablate: {differ}: their scores are not one table's; report each setting's --out apart",
              file=sys.stderr)
        return 2
    table = {"warm start": {k: _stats([w.get(k) for w in warm.values()]) for k in METRICS}}
    table["warm start"]["seeds"] = len(warm)
    for v, per_seed in results.items():
        table[v] = {k: _stats([r.get(k) for r in per_seed.values()]) for k in METRICS + LAST_STEP}
        table[v]["seeds"] = len(per_seed)
    for name, runs in [("warm start", list(warm.values()))] + [(v, list(r.values())) for v, r in results.items()]:
        for k in SCORES:  # the evaluation's own error of the seed mean, beside the seed spread
            table[name][f"{k}_eval_se"] = _eval_se([r.get(f"{k}_se") for r in runs])
    with open(os.path.join(a.out, "ablation.json"), "w") as f:
        json.dump({"table": table, "runs": results, "variants": {v: VARIANTS[v][0] for v in results}}, f, indent=1)
    md = _markdown(table) + _separations(table)
    with open(os.path.join(a.out, "ablation.md"), "w") as f:
        f.write(md)
    _plot(table, os.path.join(a.out, "ablation.png"))
    print(md)
    return 0


def _eval_se(ses: list):
    """The evaluation standard error of a mean over runs, from each run's own (None when a run has none)."""
    if not ses or any(x is None for x in ses):
        return None
    return math.sqrt(sum(x * x for x in ses)) / len(ses)


def _markdown(table: dict) -> str:
    """Cells: mean ± std over seeds; a score's cell adds its evaluation error (the mean's standard error from
    the held-out prompts and samples alone)."""
    cols = METRICS + LAST_STEP
    head = "| variant | seeds | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols) + "\n"

    def fmt(row: dict, c: str) -> str:
        s = row.get(c)
        if s is None or s[0] is None:
            return ""
        ev = row.get(f"{c}_eval_se")
        return f"{s[0]:.4f} ± {s[1]:.4f}" + (f" (eval ± {ev:.4f})" if ev is not None else "")

    return head + "".join(f"| {v} | {row.get('seeds', '')} | " + " | ".join(fmt(row, c) for c in cols) + " |\n"
                          for v, row in table.items())


def _separations(table: dict, base: str = "seqkd") -> str:
    """Each variant's held-out sampled score against ``base``: "separated" only when the difference is above 2
    standard errors of the seed spread and 2 of the evaluation's own error (#33 item 1); one seed has no spread."""
    k = "heldout_score_sampled"
    if base not in table or (table[base].get(k) or (None,))[0] is None:
        return ""
    lines = [f"\nAgainst `{base}`, held-out sampled score (separated: the difference > 2 standard errors of the seed "
             "spread and > 2 of the evaluation error):\n"]
    b = table[base]
    for v, row in table.items():
        if v in (base, "warm start") or (row.get(k) or (None,))[0] is None:
            continue
        diff = row[k][0] - b[k][0]
        seeds = min(row.get("seeds") or 0, b.get("seeds") or 0)
        seed_se = math.sqrt(row[k][1] ** 2 / row["seeds"] + b[k][1] ** 2 / b["seeds"]) if seeds > 1 else None
        ev = [row.get(f"{k}_eval_se"), b.get(f"{k}_eval_se")]
        eval_se = math.sqrt(ev[0] ** 2 + ev[1] ** 2) if None not in ev else None
        known = seed_se is not None and eval_se is not None
        separated = known and abs(diff) > 2 * seed_se and abs(diff) > 2 * eval_se
        said = ", ".join(x for x in (f"seed spread ± {seed_se:.4f}" if seed_se is not None else "one seed: no spread",
                                     f"evaluation ± {eval_se:.4f}" if eval_se is not None else "no evaluation error")
                         if x)
        lines.append(f"- {v}: {diff:+.4f} ({said}): {'separated' if separated else 'not separated'}\n")
    return "".join(lines)


def _plot(table: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("heldout_score", "heldout_score_sampled", "heldout_ce") if any((r.get(k) or (None,))[0]
                                                                                      is not None for r in table.values())]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.4), squeeze=False)
    names = list(table)
    for ax, k in zip(axes[0], keys):
        vals = [(table[n].get(k) or (None, None)) for n in names]
        ax.bar(range(len(names)), [v[0] or 0 for v in vals], yerr=[v[1] or 0 for v in vals], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_title(k, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("local", "slurm", "report"))
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="default (local): the demo task")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="default: all (opd and gad+opd only with --opd-teacher)")
    p.add_argument("--opd-teacher", default=None, help="a white-box teacher with the student's tokenizer (HF folder "
                   "or gad-convert checkpoint) for the opd and gad+opd variants")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--warmup-steps", type=int, default=120)
    p.add_argument("--steps", type=int, default=40, help="steps after the warm start, every variant")
    p.add_argument("--save-every", type=int, default=0,
                   help="a variant also checkpoints every k steps, so a killed one continues from there "
                        "(0: at its end only); resuming changes no number")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    a = p.parse_intermixed_args(argv)  # overrides may follow the options
    if a.mode == "slurm" and not a.config:
        p.error("slurm needs --config")
    if a.mode != "report" and (a.warmup_steps < 1 or a.steps < 1):
        p.error(f"--warmup-steps {a.warmup_steps} / --steps {a.steps}: each must be >= 1 (the warm start saves its "
                "checkpoint at its last step, which every variant resumes from)")
    if a.variants is None:
        a.variants = [v for v in VARIANTS if a.opd_teacher or v not in NEEDS_TEACHER]
    if a.mode != "report" and not a.opd_teacher and set(a.variants) & set(NEEDS_TEACHER):
        p.error(f"variants {sorted(set(a.variants) & set(NEEDS_TEACHER))} need --opd-teacher")
    if a.mode != "report" and a.opd_teacher and set(a.variants) & set(NEEDS_TEACHER):
        sys.path.insert(0, ROOT)
        from gad_megatron.trainer.opd import teacher_folder_problem

        problem = teacher_folder_problem(a.opd_teacher)  # before the warm start's minutes to hours
        if problem:
            p.error(f"--opd-teacher {a.opd_teacher}: {problem}")
    return {"local": run_local, "slurm": write_slurm, "report": report}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
