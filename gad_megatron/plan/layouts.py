"""Which layouts are possible, the plan of one, and every layout of a world ranked by predicted time."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from gad_megatron.models.memory import MemoryPlan, plan_memory, vllm_start_refusal
from gad_megatron.models.plan_inputs import GIB, GPU, Assumptions, Layout, Workload, planned_topology
from gad_megatron.models.steptime import plan_time
from gad_megatron.runtime.parallel import LayoutError, ParallelConfig, validate_layout
from gad_megatron.runtime.topology import TopologyError


# ---- layouts -----------------------------------------------------------------------------------------------------
def check_layout(arch, lay: Layout, world: int) -> list:
    problems = []
    try:
        validate_layout(ParallelConfig(lay.tp, lay.pp, context_parallel=lay.cp, sequence_parallel=lay.sp), world,
                        **arch.model_dims)
    except LayoutError as e:
        problems.append(str(e))
    if arch.vocab_size % lay.tp:
        problems.append(f"vocab_size={arch.vocab_size} is not divisible by TP={lay.tp}")

    try:
        planned_topology(world, lay.rollout_tp)
    except TopologyError as e:
        problems.append(str(e))
    if arch.num_query_groups % min(lay.rollout_tp, arch.num_query_groups):
        problems.append(f"rollout TP {lay.rollout_tp} does not divide the {arch.num_query_groups} KV heads")
    if lay.tp > 8 or lay.rollout_tp > 8:
        problems.append("TP beyond one node (8 GPUs) crosses the network on every layer")
    return problems


@dataclass
class Plan:
    layout: Layout
    world: int
    fits: bool
    problems: list
    memory: Optional[MemoryPlan] = None
    time: dict = field(default_factory=dict)
    workload: Optional[Workload] = None

    def summary(self, gpu: GPU) -> dict:
        out = {"layout": self.layout.describe(self.world), "world": self.world, "fits": self.fits,
               "problems": self.problems,
               "micro_batch_tokens": self.workload.micro_batch_tokens if self.workload else None}
        if self.memory is not None:
            out["memory_gib"] = self.memory.gib()
            out["gpu_memory_gib"] = gpu.memory_gib
        out.update(self.time)
        return out


def plan(arch, lay: Layout, world: int, wl: Workload, gpu: GPU, asm: Assumptions = Assumptions()) -> Plan:
    problems = check_layout(arch, lay, world)
    if problems:
        return Plan(lay, world, False, problems, workload=wl)
    mem = plan_memory(arch, lay, world, wl, gpu, asm)
    refusal = vllm_start_refusal(mem, wl, gpu)
    if mem.train_phase > gpu.memory_gib * GIB or (mem.peak > gpu.memory_gib * GIB and not refusal):
        problems.append(f"needs {mem.peak / GIB:.1f} GiB per GPU ({'rollout' if mem.rollout_phase > mem.train_phase else 'training'} "
                        f"phase), the {gpu.name} has {gpu.memory_gib}")
    if refusal:
        problems.append(refusal)
    return Plan(lay, world, not problems, problems, mem, plan_time(arch, lay, world, wl, gpu, asm), wl)


# What rollout.offload may move, as the search tries it (parameters last: the sync must read them first).
OFFLOAD_CHOICES = ((), ("grads", "optimizer"), ("grads", "optimizer", "params"))


def search(arch, world: int, wl: Workload, gpu: GPU, asm: Assumptions = Assumptions(), colocated: bool = True) -> list:
    """Every layout worth trying, fitting ones first, ranked by predicted run time."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8):
            if world % (tp * pp):
                continue
            for do in (False, True):
                for rec in (None, "selective", "full"):
                    for rtp in ((1, 2, 4, 8) if wl.stage == "gad" else (1,)):
                        for off in ((False, True) if wl.stage == "gad" else (False,)):
                            for away in (OFFLOAD_CHOICES if wl.stage == "gad" and colocated else ((),)):
                                for mbt in (4096, 8192, 16384):
                                    lay = Layout(tp, pp, 1, tp > 1, do, rec, rtp, colocated, True, off, away)
                                    out.append(plan(arch, lay, world, replace(wl, micro_batch_tokens=mbt), gpu, asm))
    # Fastest first; among equal times, the one with the most memory to spare.
    ok = sorted((p for p in out if p.fits), key=lambda p: (p.time["run_hours"], p.memory.peak))
    return ok + [p for p in out if not p.fits and p.memory is not None]


