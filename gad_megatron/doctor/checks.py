"""The checks, one function each: ``check(ctx) -> Result``. A check never raises: what goes wrong is its FAIL."""

from __future__ import annotations

import os
import resource
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from importlib import metadata

import torch

from gad_megatron.convert.api import model_hf_dir
from gad_megatron.models.hf_config import arch_spec_from_dir
from gad_megatron.rollout.base import EngineInputs, SamplingConfig
from gad_megatron.rollout.factory import ENGINES, build_engine, choose_engine, engine_class
from gad_megatron.trainer.build import vllm_config
from gad_megatron.trainer.disk import check_free_space
from gad_megatron.trainer.preflight import CHECKS, run_checks

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
ORDER = {SKIP: 0, PASS: 1, WARN: 2, FAIL: 3}  # over ranks: a check that ran on one rank counts over its skips
NO_GPU = "skipped: no GPU"


@dataclass
class Result:
    name: str
    status: str
    value: str = ""
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    cfg: object
    rank: int
    world: int
    local_rank: int
    host: str
    gpu: bool
    min_busbw_gbs: float
    allreduce_mb: int
    min_write_gbs: float
    deep: bool


# ---- GPUs ---------------------------------------------------------------------------------------------------------
def gpus(ctx: Context) -> Result:
    if not ctx.gpu:
        return Result("gpus", SKIP, detail=NO_GPU)
    n = torch.cuda.device_count()
    want = int(os.environ.get("GAD_ALLOC_GPUS_PER_NODE") or os.environ.get("SLURM_GPUS_ON_NODE", "0").split(":")[-1] or 0)
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    if want and n != want:
        return Result("gpus", FAIL, f"{n} visible", f"{ctx.host}: the allocation has {want} GPU(s) per node, {n} visible")
    return Result("gpus", PASS, f"{n} x {', '.join(names)}")


def driver(ctx: Context) -> Result:
    if not ctx.gpu:
        return Result("driver", SKIP, detail=NO_GPU)
    built = torch.version.cuda or "?"
    try:
        drv = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else torch._C._cuda_getDriverVersion()
        drv_s = f"{drv // 1000}.{drv % 1000 // 10}"
    except Exception as e:  # noqa: BLE001
        return Result("driver", WARN, f"torch CUDA {built}", f"driver version unreadable: {e}")
    major = lambda v: int(str(v).split(".")[0])  # noqa: E731
    if major(drv_s) < major(built):
        return Result("driver", FAIL, f"driver CUDA {drv_s} < torch CUDA {built}",
                      f"{ctx.host}: the driver is older than the CUDA torch was built for")
    return Result("driver", PASS, f"driver CUDA {drv_s}, torch CUDA {built}")


def fp8(ctx: Context) -> Result:
    """Compute capability >= 8.9, TE's own check_fp8_support(), and a tiny TE FP8 linear forward + backward."""
    if not ctx.gpu:
        return Result("fp8", SKIP, detail=NO_GPU)
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        status = FAIL if getattr(ctx.cfg.model, "fp8", None) else WARN
        return Result("fp8", status, f"sm_{cap[0]}{cap[1]}", "FP8 needs compute capability >= 8.9 (Hopper, Ada, Blackwell)")
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.pytorch.fp8 import check_fp8_support

        ok, why = check_fp8_support()
        if not ok:
            return Result("fp8", FAIL, f"sm_{cap[0]}{cap[1]}", f"TE: {why}")
        layer = te.Linear(64, 64, params_dtype=torch.bfloat16).cuda()
        x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with te.fp8_autocast(enabled=True):
            y = layer(x)
        y.float().sum().backward()
        torch.cuda.synchronize()
        if not torch.isfinite(x.grad).all():
            return Result("fp8", FAIL, f"sm_{cap[0]}{cap[1]}", "TE FP8 linear: non-finite gradient")
    except Exception as e:  # noqa: BLE001
        return Result("fp8", FAIL, f"sm_{cap[0]}{cap[1]}", f"TE FP8 linear forward + backward failed: {type(e).__name__}: {e}")
    return Result("fp8", PASS, f"sm_{cap[0]}{cap[1]}, TE FP8 linear fwd+bwd ok")


# ---- software -----------------------------------------------------------------------------------------------------
def _version(dist: str):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(ctx: Context) -> Result:
    """torch == each rollout engine's torch pin (vLLM's), megatron-core, Transformer Engine, apex."""
    from packaging.requirements import Requirement

    parts = [f"torch {torch.__version__}", f"megatron-core {_version('megatron-core')}"]
    problems, warns = [], []
    for engine in ENGINES:
        dist = next((d for d in engine_class(engine).distributions if _version(d)), None)
        if dist is None:
            continue
        pins = [Requirement(r) for r in metadata.requires(dist) or [] if r.startswith("torch")]
        pin = next((r for r in pins if r.name == "torch" and (r.marker is None or r.marker.evaluate())), None)
        parts.append(f"{dist} {_version(dist)}")
        if pin is not None and not pin.specifier.contains(torch.__version__, prereleases=True):
            problems.append(f"torch {torch.__version__} does not satisfy {dist}'s {pin}")
    chosen = ctx.cfg.rollout.engine
    reason = engine_class(chosen).unavailable_reason() if chosen != "auto" else None
    if reason:
        problems.append(f"rollout.engine={chosen}: {reason}")
    if not _version("megatron-core"):
        problems.append("megatron-core is not installed")
    te = _version("transformer-engine") or _version("transformer_engine")
    apex = _version("apex")
    if apex and ctx.gpu:
        import importlib

        missing = [m for m in ("amp_C", "fused_layer_norm_cuda") if importlib.util.find_spec(m) is None]
        if missing:
            warns.append(f"apex {apex} without its CUDA kernels ({', '.join(missing)}): built without --cuda_ext")
    parts += [f"transformer-engine {te}", f"apex {apex}"]
    if ctx.gpu and not te:
        (problems if getattr(ctx.cfg.model, "fp8", None) else warns).append("Transformer Engine is not installed")
    status = FAIL if problems else WARN if warns else PASS
    return Result("versions", status, ", ".join(parts), "; ".join(problems + warns))


# ---- the network --------------------------------------------------------------------------------------------------
def rendezvous(ctx: Context) -> Result:
    """Every rank opens a TCP connection to the rendezvous address (the store the process group was built on)."""
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    t0 = time.perf_counter()
    try:
        with socket.create_connection((addr, port), timeout=10):
            pass
    except OSError as e:
        return Result("rendezvous", FAIL, f"{addr}:{port}", f"rank {ctx.rank} ({ctx.host}) cannot reach {addr}:{port}: {e}")
    return Result("rendezvous", PASS, f"{addr}:{port} in {1e3 * (time.perf_counter() - t0):.1f} ms")


def nccl_transport() -> str:
    """Which network NCCL takes between nodes: NCCL_NET / NCCL_IB_DISABLE when set, else InfiniBand when the host
    has an IB device (NCCL prefers it), else sockets (TCP: a fraction of the bandwidth a 16-GPU job plans on)."""
    if os.environ.get("NCCL_NET"):
        return f"nccl via {os.environ['NCCL_NET']} (NCCL_NET)"
    ib = sorted(os.listdir("/sys/class/infiniband")) if os.path.isdir("/sys/class/infiniband") else []
    if ib and os.environ.get("NCCL_IB_DISABLE", "0") != "1":
        return f"nccl via IB ({', '.join(ib[:4])})"
    return "nccl via Socket (TCP: no InfiniBand device" + (", NCCL_IB_DISABLE=1)" if ib else ")")


def allreduce(ctx: Context) -> Result:
    """All-reduce over every rank: bus bandwidth (nccl-tests' definition: 2 (n-1)/n x bytes / time)."""
    import torch.distributed as dist

    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    x = torch.ones(ctx.allreduce_mb * 2**20 // 4, dtype=torch.float32, device=dev)
    dist.all_reduce(x)  # warm-up (and the connection set-up)
    iters = 5
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    n = ctx.world
    busbw = 2 * (n - 1) / n * x.numel() * 4 / dt / 1e9 if n > 1 else float("inf")
    transport = nccl_transport() if backend == "nccl" else f"{backend}/tcp"
    value = f"{busbw:.2f} GB/s bus, {ctx.allreduce_mb} MiB x {n} ranks, {transport}" if n > 1 else "1 rank: nothing to reduce"
    nodes = int(os.environ.get("GAD_ALLOC_NODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
    if backend == "nccl" and nodes > 1 and "Socket" in transport:
        return Result("allreduce", WARN, value, "NCCL between nodes over TCP sockets: expect a slow gradient reduction")
    if not (x == n ** (iters + 1)).all():
        return Result("allreduce", FAIL, value, "all-reduce returned a wrong sum")
    if n > 1 and busbw < ctx.min_busbw_gbs:
        return Result("allreduce", FAIL, value, f"bus bandwidth {busbw:.2f} GB/s below the minimum {ctx.min_busbw_gbs} GB/s (--min-busbw-gbs)")
    return Result("allreduce", PASS, value)


# ---- files --------------------------------------------------------------------------------------------------------
def _read_all(path: str, limit: int = 1 << 20) -> str:
    """Opens every file under ``path`` and reads its first ``limit`` bytes (a permission or a stale mount fails)."""
    files = [path] if os.path.isfile(path) else [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]
    if not files:
        raise FileNotFoundError(f"{path}: no such file or directory, or empty")
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            fh.read(limit)
        total += os.path.getsize(f)
    return f"{path} ({len(files)} file(s), {total / 1e6:.1f} MB)"


def model_readable(ctx: Context) -> Result:
    path = ctx.cfg.model.student
    try:
        value = _read_all(path)
    except OSError as e:
        return Result("model", FAIL, path, f"rank {ctx.rank} ({ctx.host}) cannot read model.student {path}: {e}")
    return Result("model", PASS, value)


def data_readable(ctx: Context) -> Result:
    values = []
    for p in (x for x in (ctx.cfg.data.train, ctx.cfg.data.heldout) if x):
        try:
            values.append(_read_all(p))
        except OSError as e:
            return Result("data", FAIL, p, f"rank {ctx.rank} ({ctx.host}) cannot read {p}: {e}")
    return Result("data", PASS, ", ".join(values))


def shared_run_dir(ctx: Context, token: str) -> Result:
    """Rank 0 wrote ``token`` to a canary in log.run_dir; every rank must read the same bytes there."""
    path = os.path.join(ctx.cfg.log.run_dir, ".doctor", "canary")
    try:
        with open(path) as f:
            seen = f.read()
    except OSError as e:
        return Result("shared_fs", FAIL, ctx.cfg.log.run_dir,
                      f"rank {ctx.rank} ({ctx.host}): log.run_dir is not shared with rank 0 (its canary is missing: {e.strerror})")
    if seen != token:
        return Result("shared_fs", FAIL, ctx.cfg.log.run_dir,
                      f"rank {ctx.rank} ({ctx.host}): log.run_dir is not rank 0's (another canary is there)")
    return Result("shared_fs", PASS, ctx.cfg.log.run_dir)


def write_canary(run_dir: str) -> str:
    token = secrets.token_hex(16)
    os.makedirs(os.path.join(run_dir, ".doctor"), exist_ok=True)
    tmp = os.path.join(run_dir, ".doctor", f"canary.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(token)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(run_dir, ".doctor", "canary"))
    return token


def disk(ctx: Context) -> Result:
    """Free space for keep_last + 1 checkpoints + the export, and the write bandwidth (64 MiB, fsync'd)."""
    run_dir = ctx.cfg.log.run_dir
    try:
        check_free_space(ctx.cfg, arch_spec_from_dir(model_hf_dir(ctx.cfg.model.student)))
    except OSError as e:
        return Result("disk", FAIL, "", str(e))
    except Exception as e:  # noqa: BLE001  (an unreadable model is the model check's FAIL)
        return Result("disk", WARN, "", f"free space not computed: {type(e).__name__}: {e}")
    st = os.statvfs(run_dir)
    free_gb = st.f_bavail * st.f_frsize / 1e9
    os.makedirs(os.path.join(run_dir, ".doctor"), exist_ok=True)
    path = os.path.join(run_dir, ".doctor", f"write.{ctx.rank}")
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    gbs = 64 * (1 << 20) / (time.perf_counter() - t0) / 1e9
    os.remove(path)
    value = f"{free_gb:.1f} GB free, write {gbs:.2f} GB/s"
    if gbs < ctx.min_write_gbs:
        return Result("disk", WARN, value, f"write bandwidth below {ctx.min_write_gbs} GB/s: checkpoints take longer than planned")
    return Result("disk", PASS, value)


# ---- the host -----------------------------------------------------------------------------------------------------
def shm(ctx: Context) -> Result:
    st = os.statvfs("/dev/shm")
    gib = st.f_blocks * st.f_frsize / 2**30
    value = f"/dev/shm {gib:.1f} GiB"
    if gib < 1:  # NCCL and vLLM's workers put their buffers there (docker's default is 64 MiB)
        return Result("shm", FAIL if ctx.gpu else WARN, value, "/dev/shm below 1 GiB (docker run --ipc=host or --shm-size)")
    return Result("shm", PASS, value)


def ulimits(ctx: Context) -> Result:
    def fmt(v):
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)

    mem = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    value = f"ulimit -l {fmt(mem)}, -n {fmt(nofile)}"
    warns = []
    if ctx.gpu and mem != resource.RLIM_INFINITY:
        warns.append("locked memory is limited (InfiniBand / GPUDirect RDMA registration needs -l unlimited)")
    if nofile != resource.RLIM_INFINITY and nofile < 65536:
        warns.append(f"open files limit {nofile} < 65536 (data loaders, vLLM and checkpoints open many)")
    return Result("ulimits", WARN if warns else PASS, value, "; ".join(warns))


def cpu_affinity(ctx: Context) -> Result:
    cpus = len(os.sched_getaffinity(0))
    want = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)
    value = f"{cpus} CPU(s) in this rank's affinity"
    if want and cpus < want:
        return Result("cpu_affinity", FAIL, value,
                      f"rank {ctx.rank} ({ctx.host}): {cpus} CPU(s) but --cpus-per-task={want} (srun: SRUN_CPUS_PER_TASK)")
    return Result("cpu_affinity", PASS, value + (f" (cpus-per-task {want})" if want else ""))


def engine_starts(ctx: Context) -> Result:
    """--deep: the run's rollout engine (one with its own copy of the weights: vLLM) starts at the rollout TP
    with the student and decodes one token (rank 0 only)."""
    if not ctx.deep:
        return Result("engine", SKIP, detail="skipped: run with --deep")
    if ctx.rank != 0:
        return Result("engine", SKIP, detail="rank 0 only")
    name, _ = choose_engine(ctx.cfg.rollout.engine)
    if engine_class(name).live_weights:
        return Result("engine", SKIP, detail=f"{name}: samples with the trainer's own model (starts with it)")
    try:
        t0 = time.perf_counter()
        engine = build_engine(name, EngineInputs(vllm=vllm_config(ctx.cfg, model_hf_dir(ctx.cfg.model.student))))
        out = engine.generate([[1, 2, 3]], SamplingConfig(n=1, temperature=1.0, max_tokens=2))
        engine.shutdown()
        text = f"{len(out[0][0].token_ids)} token(s)"  # prompt 0's first sample
    except Exception as e:  # noqa: BLE001
        return Result("engine", FAIL, "", f"{name} did not start with {ctx.cfg.model.student}: {type(e).__name__}: {e}")
    tp = ctx.cfg.rollout.vllm_tensor_parallel
    return Result("engine", PASS, f"{name} started at TP{tp} and decoded {text} in {time.perf_counter() - t0:.0f} s")


def preflight(ctx: Context) -> Result:
    """gad-train's pre-flight (trainer.preflight: config, data, positions, memory, disk, step time, resume), every
    check, on rank 0: the refusals ``gad-train --check`` lists."""
    if ctx.rank != 0:
        return Result("preflight", SKIP, detail="rank 0 only")
    found = run_checks(ctx.cfg, keep_going=True)
    ran = [name for name, _, _ in CHECKS if name not in {s for s, _ in found.skipped}]
    if found.refused:
        return Result("preflight", FAIL, "", " | ".join(f"{c}: {m}" for c, m in found.refused))
    return Result("preflight", PASS, f"{len(ran)} checks passed: {', '.join(ran)}")


def safely(check, ctx: Context, *args) -> Result:
    """A check that raises is that check's FAIL, naming the rank: the table still comes out."""
    try:
        return check(ctx, *args)
    except Exception as e:  # noqa: BLE001
        name = {"model_readable": "model", "data_readable": "data", "shared_run_dir": "shared_fs",
                "engine_starts": "engine"}.get(check.__name__, check.__name__)
        return Result(name, FAIL, "", f"rank {ctx.rank} ({ctx.host}): {type(e).__name__}: {e}")


PER_RANK = (gpus, driver, fp8, versions, rendezvous, model_readable, data_readable, shm, ulimits, cpu_affinity)
