"""``gad-plan``'s command line: the model (preset, HF dir or checkpoint), the run config, the report."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, replace

from gad_megatron.convert.api import config_dir
from gad_megatron.models.hf_config import arch_spec_from_dir, arch_spec_from_hf
from gad_megatron.models.plan_inputs import GPUS, Assumptions, Layout, Workload
from gad_megatron.models.storage import checkpoint_bytes, disk_need_bytes
from gad_megatron.plan.layouts import plan, search
from gad_megatron.trainer.config import load_config
from gad_megatron.trainer.step_estimate import layout_and_workload

# ---- inputs -------------------------------------------------------------------------------------------------------
PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "model_configs")


def load_arch(model: str):
    """An HF dir, a gad-convert checkpoint, or a preset name (the published config.json of the paper's
    students, shipped in ``assets/model_configs``: planning needs no weights)."""
    if os.path.isfile(os.path.join(config_dir(model), "config.json")):
        return arch_spec_from_dir(config_dir(model))
    key = os.path.basename(model.rstrip("/")).lower().replace("-instruct", "").replace("meta-llama-", "llama-")
    path = os.path.join(PRESETS_DIR, key + ".json")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(PRESETS_DIR))
        raise FileNotFoundError(f"{model}: not an HF dir or checkpoint, and no preset {key!r} (presets: {', '.join(names)})")
    with open(path) as f:
        return arch_spec_from_hf(json.load(f), source=path)


def from_config(cfg) -> tuple:
    """(model path, Layout, Workload) from a gad-train config (the trainer's own reading of it)."""
    return (cfg.model.student, *layout_and_workload(cfg))


def storage_plan(arch, wl: Workload, asm: Assumptions, time: dict) -> dict:
    """Checkpoint size and write time, the Slurm signal lead (write time + the longest step + slack: the signal
    lands mid-step, the step finishes, then the checkpoint is written) and the run directory's disk need."""
    gad = wl.stage == "gad"
    ckpt = checkpoint_bytes(arch, wl.dtype, with_discriminator=gad)
    write_s = ckpt / (asm.ckpt_write_gbs * 1e9)
    step_s = max(time.get("gad_step_s", 0.0), time.get("warmup_step_s", 0.0))
    return {"checkpoint_gb": round(ckpt / 1e9, 1), "checkpoint_write_s": math.ceil(write_s),
            "step_s_max": math.ceil(step_s), "signal_lead_s": math.ceil(write_s + step_s + asm.signal_slack_s),
            "disk_need_gb": round(disk_need_bytes(arch, wl.dtype, wl.keep_last, wl.export_hf, gad) / 1e9, 1)}


def _parser():
    ap = argparse.ArgumentParser(prog="gad-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="gad-train YAML (model, layout and batch from it)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides of --config")
    ap.add_argument("--model", help="HF dir, checkpoint or preset (qwen2.5-3b/7b/14b, llama-3.2-3b, llama-3.1-8b)")
    ap.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int), ap.add_argument("--pp", type=int), ap.add_argument("--rollout-tp", type=int)
    ap.add_argument("--search", action="store_true", help="rank every layout for this model and world")
    ap.add_argument("--mfu", type=float, default=Assumptions.mfu)
    ap.add_argument("--ckpt-write-gbs", type=float, default=Assumptions.ckpt_write_gbs,
                    help="the run directory's write bandwidth, GB/s: checkpoint time and the Slurm signal lead")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shell", action="store_true", help="KEY=VALUE lines (the sbatch scripts eval them)")
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        # A zero is a value given, not "not given" (it used to fall back to the config's layout silently).
        bad = [f"--{k.replace('_', '-')} {v}" for k, v in (("tp", a.tp), ("pp", a.pp), ("rollout_tp", a.rollout_tp),
                                                          ("nodes", a.nodes), ("gpus_per_node", a.gpus_per_node))
               if v is not None and v < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be >= 1")
        if not 0 < a.mfu <= 1:
            raise ValueError(f"--mfu {a.mfu}: a fraction of the GPU's peak, in (0, 1]")
        lay, wl = Layout(), Workload()
        model = a.model
        if a.config:
            model_cfg, lay, wl = from_config(load_config(a.config, a.overrides))
            model = model or model_cfg
        if not model:
            raise ValueError("give --config or --model")
        lay = replace(lay, **{k: v for k, v in (("tp", a.tp), ("pp", a.pp), ("rollout_tp", a.rollout_tp))
                              if v is not None})
        arch = load_arch(model)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"gad-plan: error: {e}", file=sys.stderr)
        return 2
    gpu, world = GPUS[a.gpu], a.nodes * a.gpus_per_node
    asm = Assumptions(mfu=a.mfu, ckpt_write_gbs=a.ckpt_write_gbs)
    if a.search:
        plans = search(arch, world, wl, gpu, asm, lay.colocated)
        rows = [p.summary(gpu) for p in plans]
        if a.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"{model} on {a.nodes} x {a.gpus_per_node} {gpu.name}: {sum(p.fits for p in plans)} layouts fit")
            for p in plans[:15]:
                s = p.summary(gpu)
                print(f"  {'fits' if p.fits else 'NO  '} {s['layout']:<66} mb {s['micro_batch_tokens']:>5}  "
                      f"peak {s['memory_gib']['peak']:6.1f} GiB  run {s['run_hours']:6.1f} h")
        return 0 if any(p.fits for p in plans) else 1
    p = plan(arch, lay, world, wl, gpu, asm)
    s = {**p.summary(gpu), **storage_plan(arch, wl, asm, p.time)}
    dp = world // (lay.tp * lay.pp * lay.cp)
    if a.shell:
        mem = s.get("memory_gib", {})
        print("\n".join([f"TP={lay.tp}", f"PP={lay.pp}", f"DP={dp}", f"ROLLOUT_TP={lay.rollout_tp}",
                         f"WORLD={world}", f"FITS={int(p.fits)}", f"PEAK_GIB={mem.get('peak', 'n/a')}",
                         f"LAYOUT='{s['layout']}'", f"RUN_HOURS={round(s.get('run_hours', 0), 1)}",
                         f"CKPT_GB={s['checkpoint_gb']}", f"CKPT_WRITE_S={s['checkpoint_write_s']}",
                         f"STEP_S={s['step_s_max']}", f"SIGNAL_LEAD_S={s['signal_lead_s']}",
                         f"DISK_NEED_GB={s['disk_need_gb']}"]))
        return 0 if p.fits else 1
    if a.json:
        print(json.dumps({**s, "assumptions": asdict(asm), "workload": asdict(wl)}, indent=1))
    else:
        print(f"{model} on {a.nodes} x {a.gpus_per_node} {gpu.name}: {s['layout']}")
        if "memory_gib" in s:
            m = s["memory_gib"]
            print("  memory per GPU (GiB): " + ", ".join(f"{k} {m[k]}" for k in (
                "weights", "grads", "optimizer", "activations", "logits", "reference", "vllm_weights", "vllm_kv",
                "megatron_kv", "overhead")))
            print(f"  training phase {m['train_phase']} GiB, rollout phase {m['rollout_phase']} GiB, "
                  f"peak {m['peak']} of {gpu.memory_gib}")
            print("  step (s): " + ", ".join(f"{k} {v}" for k, v in s["step_s"].items())
                  + f"; GAD step {s['gad_step_s']:.1f} s, warmup step {s['warmup_step_s']:.1f} s")
            print(f"  run ({wl.warmup_steps} warmup + {wl.gad_steps} GAD steps): {s['run_hours']:.1f} h")
        print(f"  checkpoint {s['checkpoint_gb']} GB, written in {s['checkpoint_write_s']} s at {asm.ckpt_write_gbs} GB/s; "
              f"signal lead {s['signal_lead_s']} s; disk for keep_last {wl.keep_last} + export: {s['disk_need_gb']} GB")
        for prob in p.problems:
            print(f"  refused: {prob}")
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
