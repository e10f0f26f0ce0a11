"""``gad-doctor [--config RUN.yaml | --demo] [dotted.key=value ...]``: the pre-flight table (see the package doc).

    gad-doctor --demo parallel.nproc=2                  # CPU, 2 gloo ranks
    srun --ntasks-per-node=8 gad-doctor --config examples/configs/gad_qwen2.5_14b.yaml   (the job script does this)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys

from gad_megatron.doctor import checks
from gad_megatron.doctor.checks import FAIL, ORDER, Context, Result
from gad_megatron.runtime.launch import LAUNCHER_PID, relaunch, under_launcher
from gad_megatron.runtime.parallel import ParallelConfig, _env_world, _free_port
from gad_megatron.trainer.cli import _prepare_demo, _quiet
from gad_megatron.trainer.config import ConfigError, load_config


def _parser():
    p = argparse.ArgumentParser(prog="gad-doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the run's YAML config (as gad-train)")
    p.add_argument("--demo", action="store_true", help="the CPU demo's config (as gad-train --demo)")
    p.add_argument("--deep", action="store_true", help="also start vLLM with the student at the rollout TP")
    p.add_argument("--min-busbw-gbs", type=float, default=None,
                   help="all-reduce bus bandwidth below this FAILs (default: 10 on GPUs, 0 on CPU)")
    p.add_argument("--min-write-gbs", type=float, default=0.5, help="run directory write bandwidth below this WARNs")
    p.add_argument("--allreduce-mb", type=int, default=None, help="all-reduce size (default: 256 MiB on GPUs, 16 on CPU)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (as gad-train)")
    return p


def _worst(rows: list) -> Result:
    """One check over all ranks: the worst status, its rank's message, the values when they differ."""
    worst = max(rows, key=lambda r: ORDER[r.status])
    values = sorted({r.value for r in rows if r.value})
    value = values[0] if len(values) == 1 else worst.value or (values[0] if values else "")
    if len(values) > 1 and rows[0].name in ("allreduce", "rendezvous", "model", "data", "shared_fs"):
        value = worst.value
    return Result(worst.name, worst.status, value, worst.detail)


def table(results: list) -> str:
    w = max(len(r.name) for r in results)
    lines = [f"{'check':<{w}}  status  value / detail"]
    for r in results:
        text = r.value + (f"  -- {r.detail}" if r.detail else "")
        lines.append(f"{r.name:<{w}}  {r.status:<6}  {text}")
    return "\n".join(lines)


def _run_checks(cfg, args, rank: int, world: int, local_rank: int, gpu: bool) -> list:
    import torch.distributed as dist

    ctx = Context(cfg, rank, world, local_rank, socket.gethostname(), gpu,
                  args.min_busbw_gbs if args.min_busbw_gbs is not None else (10.0 if gpu else 0.0),
                  args.allreduce_mb or (256 if gpu else 16), args.min_write_gbs, args.deep)
    mine = [checks.safely(c, ctx) for c in checks.PER_RANK]
    mine.append(checks.safely(checks.allreduce, ctx))
    token = [checks.write_canary(cfg.log.run_dir) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    mine.append(checks.safely(checks.shared_run_dir, ctx, token[0]))
    mine.append(checks.safely(checks.disk, ctx) if local_rank == 0 else Result("disk", checks.SKIP, detail="local rank 0 checks"))
    mine.append(checks.safely(checks.engine_starts, ctx))
    mine.append(checks.safely(checks.preflight, ctx))
    every = [None] * world
    dist.all_gather_object(every, [r.to_dict() for r in mine])
    return [[Result(**d) for d in rank_rows] for rank_rows in every]


def _report(cfg, per_rank: list) -> tuple:
    names = [r.name for r in per_rank[0]]
    merged = [_worst([rows[i] for rows in per_rank]) for i in range(len(names))]
    report = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "world": len(per_rank),
              "checks": [r.to_dict() for r in merged], "ranks": [[r.to_dict() for r in rows] for rows in per_rank],
              "ok": not any(r.status == FAIL for r in merged)}
    path = os.path.join(cfg.log.run_dir, "doctor.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
    return merged, path, report["ok"]


def _uses_gpu(cfg) -> bool:
    """The run's own device decision (parallel.device; unset: the runtime's), not merely whether CUDA exists."""
    return ParallelConfig(device=cfg.parallel.device).resolved_device() == "cuda"


def run_rank(cfg, args) -> int:
    import torch
    import torch.distributed as dist

    rank, world, local_rank = _env_world()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one rank alone: a free port (two doctors on a host must not collide)
        os.environ["MASTER_PORT"] = str(_free_port()) if world == 1 else "29500"
    gpu = _uses_gpu(cfg)
    if gpu:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if gpu else "gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        per_rank = _run_checks(cfg, args, rank, world, local_rank, gpu)
        ok = [True]
        if rank == 0:
            merged, path, ok[0] = _report(cfg, per_rank)
            print(table(merged))
            print(f"gad-doctor: {'ok' if ok[0] else 'FAIL'} ({world} rank(s)); report {path}")
        dist.broadcast_object_list(ok, src=0)
        if os.environ.get(LAUNCHER_PID):
            return 0  # our own launcher reads the verdict from the report (a failing rank would make torchrun noisy)
        return 0 if ok[0] else 1
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)

    _quiet()
    try:
        config = args.config or (_prepare_demo() if args.demo else None)
        if not config:
            raise ConfigError("give --config RUN.yaml or --demo")
        cfg = load_config(config, args.overrides)
        os.makedirs(cfg.log.run_dir, exist_ok=True)
    except (ConfigError, OSError, ValueError) as e:
        print(f"gad-doctor: error: {e}", file=sys.stderr)
        return 2
    if cfg.parallel.nproc > 1 and not under_launcher():
        report = os.path.join(cfg.log.run_dir, "doctor.json")
        if os.path.exists(report):
            os.remove(report)  # the verdict read below is this run's
        rc = relaunch("gad_megatron.doctor.cli", argv, cfg.parallel.nproc)
        if rc != 0 or not os.path.exists(report):
            return rc or 1
        return 0 if json.load(open(report))["ok"] else 1
    return run_rank(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
