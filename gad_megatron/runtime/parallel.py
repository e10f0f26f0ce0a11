"""One parallel runtime for GPU (nccl) and CPU (gloo).

The student, the discriminator and the frozen reference model are all built on the single megatron-core
``parallel_state`` this module initialises.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

from gad_megatron.runtime.launch import under_launcher


class LayoutError(ValueError):
    """The requested TP/PP/CP/VPP layout does not fit the world size or the model."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    context_parallel: int = 1
    sequence_parallel: bool = False
    device: Optional[str] = None  # "cuda" | "cpu"; None: cuda when available
    seed: int = 1234
    timeout_minutes: int = 30

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel


def validate_layout(
    par: ParallelConfig,
    world_size: int,
    num_layers: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
) -> int:
    """Checks the layout against the world size and (optionally) the model; returns the DP size.

    Raises one LayoutError naming every problem, before anything is allocated.
    """
    problems = []
    tp, pp, cp = par.tensor_parallel, par.pipeline_parallel, par.context_parallel
    for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("context_parallel", cp)):
        if v < 1:
            problems.append(f"{name}={v} must be >= 1")
    if problems:
        raise LayoutError("; ".join(problems))
    mp = tp * pp * cp
    if world_size % mp:
        problems.append(f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {mp}")
    if num_attention_heads is not None and num_attention_heads % tp:
        problems.append(f"num_attention_heads={num_attention_heads} is not divisible by TP={tp}")
    if num_query_groups is not None and num_query_groups % tp:
        problems.append(f"num_query_groups (num_key_value_heads)={num_query_groups} is not divisible by TP={tp}")
    vpp = par.virtual_pipeline_parallel or 1
    if par.virtual_pipeline_parallel is not None and pp == 1:
        problems.append("virtual_pipeline_parallel needs pipeline_parallel > 1")
    if num_layers is not None and num_layers % (pp * vpp):
        problems.append(f"num_layers={num_layers} is not divisible by PP*VPP = {pp}*{vpp} = {pp * vpp}")
    if par.sequence_parallel and tp == 1:
        problems.append("sequence_parallel needs tensor_parallel > 1")
    if problems:
        raise LayoutError("invalid parallel layout: " + "; ".join(problems))
    return world_size // mp


_DEVICE: Optional[str] = None  # decided once, by initialize()


def device() -> torch.device:
    """The device this process computes on, as :func:`initialize` decided it (``parallel.device``, or cuda
    when available). Every device question in the package asks this, so a CPU run on a machine that has a
    GPU (``parallel.device=cpu``) stays on the CPU everywhere. Before ``initialize``: cuda when available."""
    kind = _DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def model_forward_region():
    """Around a model's own forward: on CPU it runs outside the CPU shim's device redirect (a Python call per torch
    op; nothing in the forward needs it), on GPU a no-op. Collectives and schedules stay outside it."""
    if _DEVICE == "cpu":
        from gad_megatron.runtime import cpu_shim  # imported already by initialize on CPU

        return cpu_shim.redirect_paused()
    return contextlib.nullcontext()


def on_cuda() -> bool:
    """This process computes on a GPU (:func:`device`)."""
    return device().type == "cuda"


def _gpu_properties(wanted: Optional[str]):
    kind = wanted or _DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device())


def device_memory_bytes(wanted: Optional[str] = None) -> Optional[int]:
    """Total memory of the GPU this process would compute on (``wanted``: ``parallel.device``; None: cuda when
    available); None when it would compute on the CPU."""
    props = _gpu_properties(wanted)
    return None if props is None else props.total_memory


def host_memory_limit(env=None, cgroup_root: str = "/sys/fs/cgroup") -> tuple:
    """(bytes, what sets them): the least of the machine's RAM, this process's address-space limit (``ulimit -v``),
    its cgroup's memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and the Slurm job's memory
    (``SLURM_MEM_PER_NODE``, MB). A job is killed at the smallest of them, not at the machine's RAM."""
    import resource

    import psutil

    env = os.environ if env is None else env
    limits = [(psutil.virtual_memory().total, "the machine's RAM")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        limits.append((soft, "this process's address-space limit (ulimit -v)"))
    for name in ("memory.max", os.path.join("memory", "memory.limit_in_bytes")):
        try:
            text = open(os.path.join(cgroup_root, name)).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "no limit" with a huge number, v2 with "max"
            limits.append((int(text), f"the cgroup's {os.path.basename(name)}"))
    mem = env.get("SLURM_MEM_PER_NODE", "")
    if mem.isdigit() and int(mem) > 0:
        limits.append((int(mem) * 2**20, "the Slurm job's memory (--mem)"))
    return min(limits)


def device_name(wanted: Optional[str] = None) -> Optional[str]:
    """The name of that GPU (e.g. "NVIDIA H200"); None when the process would compute on the CPU."""
    props = _gpu_properties(wanted)
    return None if props is None else props.name


def comm_device() -> torch.device:
    """Where tensors for torch.distributed collectives must live: NCCL takes only CUDA tensors, gloo CPU ones.
    Every collective on a small host-side tensor (flags, metric sums, sampled tokens) goes through this."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_world() -> tuple[int, int, int]:
    """(rank, world, local rank): torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or an srun step's SLURM_* (MASTER_ADDR /
    PORT come from the sbatch script); else one rank. The same decision as ``launch.under_launcher``: a batch
    script's own SLURM_NTASKS (no srun step) is not a world to wait for."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if under_launcher():  # inside an srun step
        return int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def ranks_per_node(world: int) -> int:
    """Ranks on each node: torchrun's LOCAL_WORLD_SIZE, an srun step's SLURM_NTASKS_PER_NODE (or the first
    count of SLURM_TASKS_PER_NODE, e.g. "8(x2)"); else all ``world`` ranks on one node."""
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key) and (key == "LOCAL_WORLD_SIZE" or "SLURM_STEP_NUM_TASKS" in env):
            head = env[key].split(",")[0].split("(")[0]
            if head.isdigit() and 0 < int(head) <= world:
                return int(head)
    return world


def initialize(par: ParallelConfig, model_dims: Optional[dict] = None) -> dict:
    """Initialise torch.distributed (env:// rendezvous), megatron parallel_state and the seeds.

    ``model_dims`` (num_layers / num_attention_heads / num_query_groups) lets the layout be validated
    against the model before any process group or tensor is created.
    Returns a small dict describing this rank's place in the layout.
    """
    rank, world, local_rank = _env_world()
    global _DEVICE
    dp = validate_layout(par, world, **(model_dims or {}))
    device = _DEVICE = par.resolved_device()
    if device == "cpu":
        from gad_megatron.runtime import cpu_shim  # only ever imported on CPU

        cpu_shim.apply()
    else:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            # One rank alone (no launcher gave a port): a free port of its own, so two runs on one host do not
            # collide on the default. Several ranks must agree on one: torchrun / srun / the sbatch set it.
            os.environ["MASTER_PORT"] = str(_free_port()) if world == 1 else "29500"
        dist.init_process_group(
            backend="gloo" if device == "cpu" else "nccl",
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=par.timeout_minutes),
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_parallel,
        context_parallel_size=par.context_parallel,
        distributed_timeout_minutes=par.timeout_minutes,
    )
    set_seed(par.seed)
    return {
        "rank": rank,
        "world_size": world,
        "per_node": ranks_per_node(world),
        "data_parallel": dp,
        "device": device,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
    }


def set_seed(seed: int) -> None:
    """Same seed on every rank for data order; megatron forks per-TP-rank streams for model-parallel init."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    if ps.model_parallel_is_initialized():
        # Offset by pipeline rank, as Megatron-LM does, so stages do not draw the same numbers.
        model_parallel_cuda_manual_seed(seed + 100 * ps.get_pipeline_model_parallel_rank())


def destroy() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()  # collective: every rank is done before any group goes away
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
